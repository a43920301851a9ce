"""Built-in consistency modes. Importing this package registers them by name."""

from synctrain.strategies import allreduce  # noqa: F401  (registers "sync")

try:  # the parameter-server mode ("async")
    from synctrain.strategies import paramserver  # noqa: F401
except ImportError as _exc:  # pragma: no cover - only while the module is absent
    if "paramserver" not in str(_exc):
        raise
