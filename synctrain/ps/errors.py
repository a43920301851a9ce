"""Errors of the parameter server. Each says what happened and what to do.

They carry only a message (no extra constructor arguments) so that Ray can re-raise them
unchanged on the worker that called a shard.
"""

from __future__ import annotations

from synctrain.errors import SynctrainError


class ParameterServerError(SynctrainError, RuntimeError):
    """Base class: a parameter-server shard refused a request or could not serve it."""


class StaleJobError(ParameterServerError):
    """A request carried another job's id (a worker of an older job): it is fenced off."""


class StalenessTimeoutError(ParameterServerError):
    """A worker waited longer than ``wait_timeout_s`` for the staleness bound to be met."""


class NonFiniteGradientError(ParameterServerError, ValueError):
    """A pushed gradient held NaN or Inf; nothing was applied."""


class GradientShapeError(ParameterServerError, ValueError):
    """A pushed gradient (or initial parameters) did not match the shard's layout."""


class UnsupportedOptimizerError(ParameterServerError, TypeError):
    """``prepare_optimizer`` got an optimizer the shards cannot recreate."""
