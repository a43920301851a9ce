"""``synctrain run --workers N ... train.py [ARGS...]``: a plain script as every worker's loop.

Theory of operation
-------------------
A plain PyTorch script -- one that runs in a single process and calls
``synctrain.prepare_model``/``prepare_optimizer``/``prepare_data_loader`` -- becomes the
training loop of a :class:`~synctrain.Trainer` job, as ``torchrun`` runs one copy per rank:

* the driver (this process) reads the script and builds a :class:`ScriptLoop` holding its
  path, its source, its arguments and the working directory; the loop travels to the workers
  like any training loop (cloudpickled, by reference to this module);
* in each worker, :func:`run_script` runs the script with :func:`runpy.run_path` under
  ``__main__`` with ``sys.argv = [script, *ARGS]``, the script's directory first on
  ``sys.path`` and the driver's working directory as its own (when that exists there). The
  file is run where it is when its bytes there are the source the driver read; otherwise
  (another machine without it, or a changed file) the shipped source is written to a
  temporary directory and run from there. A ``sys.exit(0)`` (or ``sys.exit()``) is a finished
  run; any other exit status is a failure (:class:`ScriptExitError`), like an exception;
* the job's config (``--config FILE``, ``--set key=value``) is the loop's config, so the
  script reads it as ``synctrain.get_context().config``;
* each rank's ``sys.stdout``/``sys.stderr`` go to ``output/rank-<r>.stdout|.stderr`` in the
  job directory (bounded: :data:`MAX_OUTPUT_BYTES` per stream and run), not through Ray's log
  forwarding; the driver shows rank 0's as they grow (:class:`OutputTail`) and, when the job
  fails, the last lines of the failing rank's, prefixed ``[rank r]``.

A restarted generation runs the script again from its first line (in a new process or the
same one), and the helpers put it back where the job was, exactly as for a loop function.

The command line (:func:`add_trainer_flags`) has a flag for every Trainer keyword and every
mode option, generated from ``Trainer.__init__``'s signature and the strategies' option
tables, so a new option gets its flag. Exit codes (:func:`launch`): 0 when every rank's script
finished, 1 when the job failed (a rank raised or exited non-zero beyond ``max_failures``), 2
for a usage error (a bad flag, config or option value, a job name in use).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import io
import json
import os
import pathlib
import runpy
import shutil
import sys
import tempfile
import threading
from typing import Any

from synctrain.errors import SynctrainError

#: Bytes each rank's stdout (and stderr) may write to its file per run; beyond, a note.
MAX_OUTPUT_BYTES = 256 * 1024 * 1024
#: Lines of the failing rank's output shown when the job fails.
FAILURE_TAIL_LINES = 30
#: How often the driver looks for new output of rank 0.
TAIL_POLL_S = 0.2
#: Bytes read from an output file per look.
TAIL_CHUNK_BYTES = 1 << 20
#: A config file may be at most this big.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
#: Trainer keywords without a flag: the loop, its config (``--config``/``--set``), the mode
#: options as one dict (each has its own flag), a secret (``SYNCTRAIN_COORDINATOR_TOKEN``)
#: and test hooks.
NO_FLAG = ("self", "train_loop", "config", "strategy_options", "coordinator_token", "_fault_hooks",
           "mode_options")
#: Other spellings: the issue's and torchrun's ``--workers``, and the ``--address`` of before.
ALIASES = {"num_workers": ("--workers",), "ray_address": ("--address",)}
HELP = {
    "num_workers": "workers (ranks) to run the script on; without it the script runs once, here",
    "mode": "sync (all-reduce) or async (parameter server)",
    "use_gpu": "auto (a GPU per worker when the cluster has them), true or false",
    "resources_per_worker": "what each worker takes, e.g. CPU=2,GPU=1 (or a JSON object)",
    "ray_address": "Ray cluster to join (default: RAY_ADDRESS, else a running `ray start` one, else a local one)",
    "seed": "seed shared by the ranks (data order, the checkpointed RNG)",
    "progress": "show a progress bar (a line per N steps when not on a terminal)",
    "job_name": "the job's name (default: the script's name, the date and time)",
    "storage_path": "where job directories go (default: $SYNCTRAIN_STORAGE_PATH, else ~/synctrain_results)",
    "step_log": "keep the job's step log (fault tolerance); --no-step-log: the first failure ends the job",
    "coordinator": "an external coordinator cluster 'host:port,...' (token: SYNCTRAIN_COORDINATOR_TOKEN)",
    "staleness": "async: how many clocks a worker may run ahead (none: unbounded)",
    "num_ps_shards": "async: parameter-server shards",
    "grad_accum_steps": "sync: micro-steps per optimizer step",
}


class ScriptExitError(SynctrainError, RuntimeError):
    """The script called ``sys.exit`` with a status other than 0."""


class UsageError(SynctrainError, ValueError):
    """A bad command line, config file or ``--set`` value: exit status 2."""


# ---------------------------------------------------------------------- worker side
@dataclasses.dataclass(frozen=True)
class ScriptLoop:
    """The training loop that runs a script (see the module doc)."""

    path: str  # absolute, on the driver's machine
    source: bytes
    argv: tuple[str, ...]
    cwd: str
    output_dir: str | None = None  # where ranks write their stdout/stderr (None: not redirected)

    @classmethod
    def read(cls, script: str | os.PathLike[str], argv: list[str], output_dir: str | None) -> ScriptLoop:
        path = pathlib.Path(script).resolve()
        return cls(str(path), path.read_bytes(), tuple(argv), os.getcwd(), output_dir)

    @property
    def __name__(self) -> str:  # Trainer names a job after its loop
        return pathlib.Path(self.path).stem

    def __call__(self, config: dict[str, Any]) -> None:
        run_script(self)


def run_script(loop: ScriptLoop) -> None:
    """Run the script once in this worker as ``__main__`` (see the module doc)."""
    from synctrain.api import get_context

    rank = get_context().rank
    saved = (list(sys.argv), list(sys.path), os.getcwd(), sys.stdout, sys.stderr)
    output = _RankOutput(loop.output_dir, rank) if loop.output_dir else None
    path, copy_dir = _script_here(loop)
    try:
        if output is not None:
            sys.stdout, sys.stderr = output.stdout, output.stderr
        if copy_dir is not None:
            print(f"synctrain: {loop.path} is not on this machine as the driver read it: running the "
                  "copy sent with the job (modules beside the script are not there)", file=sys.stderr)
        if os.path.isdir(loop.cwd):
            os.chdir(loop.cwd)
        sys.argv = [loop.path, *loop.argv]
        sys.path.insert(0, os.path.dirname(path))
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as exc:
            _check_exit(exc, pathlib.Path(loop.path).name)
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        sys.stdout, sys.stderr = saved[3], saved[4]
        try:
            os.chdir(saved[2])
        except OSError:
            pass
        if output is not None:
            output.close()
        if copy_dir is not None:
            shutil.rmtree(copy_dir, ignore_errors=True)


def _check_exit(exc: SystemExit, name: str) -> None:
    """``sys.exit()``/``sys.exit(0)``: the script finished. Anything else is a failure."""
    code = exc.code
    if code is None or code == 0:
        return
    if isinstance(code, int):
        raise ScriptExitError(f"{name} exited with status {code}") from None
    print(code, file=sys.stderr)  # what Python prints for sys.exit("message")
    raise ScriptExitError(f"{name} exited with status 1: {str(code)[:500]}") from None


def _script_here(loop: ScriptLoop) -> tuple[str, str | None]:
    """The path to run: the script itself when its bytes here are the ones the driver read,
    else a copy of them in a new temporary directory (returned too, to be removed)."""
    try:
        with open(loop.path, "rb") as f:
            if hashlib.sha256(f.read()).digest() == hashlib.sha256(loop.source).digest():
                return loop.path, None
    except OSError:
        pass
    copy_dir = tempfile.mkdtemp(prefix="synctrain-script-")
    path = os.path.join(copy_dir, os.path.basename(loop.path))
    with open(path, "wb") as f:
        f.write(loop.source)
    return path, copy_dir


class _CappedText(io.TextIOBase):
    """A text stream into a file that stops at ``MAX_OUTPUT_BYTES`` (with a note)."""

    def __init__(self, path: pathlib.Path) -> None:
        self._file = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
        self._left = MAX_OUTPUT_BYTES
        self.name = str(path)

    def write(self, text: str) -> int:
        if self._left <= 0:
            return len(text)
        if len(text) > self._left:
            self._file.write(text[: self._left])
            self._file.write(f"\n[synctrain: output cut at {MAX_OUTPUT_BYTES} bytes]\n")
        else:
            self._file.write(text)
        self._left -= len(text)
        return len(text)

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes first
            self._file.close()


class _RankOutput:
    def __init__(self, output_dir: str, rank: int) -> None:
        directory = pathlib.Path(output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.stdout = _CappedText(directory / f"rank-{rank}.stdout")
        self.stderr = _CappedText(directory / f"rank-{rank}.stderr")

    def close(self) -> None:
        self.stdout.close()
        self.stderr.close()


# ---------------------------------------------------------------------- driver side
def output_dir_for(storage: str | os.PathLike[str], job_name: str) -> pathlib.Path:
    return pathlib.Path(os.path.expanduser(os.fspath(storage))) / job_name / "output"


class OutputTail(threading.Thread):
    """Copies what rank 0 writes to its output files onto the driver's stdout and stderr,
    line by line, above a progress bar if one is drawn; output from before it started (an
    earlier run of a resumed job) is skipped."""

    def __init__(self, output_dir: pathlib.Path, rank: int = 0) -> None:
        super().__init__(name="rank-output", daemon=True)
        self.files = [(output_dir / f"rank-{rank}.stdout", "stdout"),
                      (output_dir / f"rank-{rank}.stderr", "stderr")]
        self.offsets = {path: _size(path) for path, _ in self.files}
        self.partial = {path: b"" for path, _ in self.files}
        self._stop_event = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._stop_event.wait(TAIL_POLL_S):
            self.drain()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        self.drain(final=True)

    def drain(self, final: bool = False) -> None:
        from tqdm import tqdm

        for path, stream in self.files:
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets[path])
                    data = f.read(TAIL_CHUNK_BYTES)
            except OSError:
                continue
            self.offsets[path] += len(data)
            data = self.partial[path] + data
            *lines, rest = data.split(b"\n")
            if final and rest:
                lines, rest = [*lines, rest], b""
            self.partial[path] = rest
            out = sys.stdout if stream == "stdout" else sys.stderr
            for line in lines:
                tqdm.write(line.decode("utf-8", "replace"), file=out)
            out.flush()


def failure_output(output_dir: pathlib.Path | None, rank: int | None) -> list[str]:
    """The last lines of a rank's stderr (else stdout), each prefixed ``[rank r]``."""
    if output_dir is None or rank is None:
        return []
    for suffix in ("stderr", "stdout"):
        path = output_dir / f"rank-{rank}.{suffix}"
        try:
            with open(path, "rb") as f:
                f.seek(max(0, _size(path) - 64 * 1024))
                lines = f.read().decode("utf-8", "replace").splitlines()[-FAILURE_TAIL_LINES:]
        except OSError:
            continue
        if lines:
            return [f"[rank {rank}] {line}" for line in lines]
    return []


def _size(path: pathlib.Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def launch(args: argparse.Namespace, script: pathlib.Path) -> int:
    """Run ``script`` on ``args.num_workers`` workers; the exit status (module doc)."""
    from synctrain.driver import jobdir
    from synctrain.errors import ConfigError, ResourcesError, TrainingFailedError
    from synctrain.trainer import Trainer

    try:
        config = load_config(args.config, args.set)
        kwargs = trainer_kwargs(args)
        job_name = kwargs.pop("job_name", None) or os.environ.get("SYNCTRAIN_JOB_NAME") or \
            jobdir.default_job_name(script.stem)
        storage = kwargs.get("storage_path") or jobdir.default_storage()
        output_dir = (output_dir_for(storage, job_name) if kwargs.get("step_log", True)
                      else pathlib.Path(tempfile.mkdtemp(prefix="synctrain-output-")))
        loop = ScriptLoop.read(script, list(args.script_args), str(output_dir))
        trainer = Trainer(loop, config=config, job_name=job_name, **kwargs)
    except (UsageError, ConfigError, ResourcesError) as exc:
        print(f"synctrain run: {exc}", file=sys.stderr)
        return 2
    tail = OutputTail(output_dir)
    try:
        result = trainer.fit()
    except (ConfigError, ResourcesError) as exc:  # found before any worker ran: a usage error
        tail.stop()
        print(f"synctrain run: {exc}", file=sys.stderr)
        return 2
    except TrainingFailedError as exc:
        tail.stop()
        for line in failure_output(output_dir, exc.rank if exc.rank != 0 else None):  # rank 0's: shown
            print(line, file=sys.stderr)
        print(f"synctrain run: training failed: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - e.g. the Ray cluster went away: the job failed
        tail.stop()
        print(f"synctrain run: the job failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        tail.stop()
        print(f"synctrain run: interrupted; `synctrain resume {job_name}` continues the job",
              file=sys.stderr)
        return 130
    tail.stop()
    others = sorted(p.name for p in output_dir.glob("rank-*") if not p.name.startswith("rank-0.")
                    and _size(p) > 0)
    if others:
        print(f"synctrain run: the other ranks' output is in {output_dir} ({', '.join(others[:4])}"
              f"{' ...' if len(others) > 4 else ''})", file=sys.stderr)
    print(f"synctrain run: {script.name} finished on {trainer.num_workers} workers in "
          f"{result.elapsed_s:.1f} s ({len(result.steps)} steps, job {job_name!r})", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- flags and config
def trainer_parameters() -> list[inspect.Parameter]:
    """The Trainer keywords that get a flag."""
    from synctrain.trainer import Trainer

    return [p for name, p in inspect.signature(Trainer.__init__).parameters.items()
            if name not in NO_FLAG]


def mode_options() -> dict[str, tuple[str, Any]]:
    """Every mode's options: name -> (mode, default)."""
    from synctrain.strategies.base import get_strategy_class, registered_modes

    out: dict[str, tuple[str, Any]] = {}
    for mode in registered_modes():
        module = sys.modules[get_strategy_class(mode).__module__]
        for name, default in getattr(module, "DEFAULT_OPTIONS", {}).items():
            out.setdefault(name, (mode, default))
    return out


def add_trainer_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per Trainer keyword and per mode option (defaults: Trainer's own)."""
    group = parser.add_argument_group("Trainer options (with --workers; defaults are Trainer's)")
    for p in trainer_parameters():
        flags = [f"--{p.name.replace('_', '-')}", *ALIASES.get(p.name, ())]
        if p.name == "num_workers":
            flags.reverse()  # --workers first, as the usage line shows it
        help_ = HELP.get(p.name, f"Trainer({p.name}=...)")
        help_ += "" if "default" in help_ else f" (default: {p.default!r})"
        _add_flag(group, flags, p.name, str(p.annotation), p.default, help_)
    group = parser.add_argument_group("mode options (with --workers; see docs/sync.md, docs/async.md)")
    for name, (mode, default) in mode_options().items():
        help_ = f"{HELP.get(name, f'{mode}: Trainer({name}=...)')} (default: {default!r})"
        kind = "bool" if isinstance(default, bool) else "literal"
        _add_flag(group, [f"--{name.replace('_', '-')}"], name, kind, default, help_)


def _add_flag(group: Any, flags: list[str], dest: str, annotation: str, default: Any, help_: str) -> None:
    common = {"dest": dest, "default": None, "help": help_.replace("%", "%%")}
    if dest == "mode":
        from synctrain.strategies.base import registered_modes

        group.add_argument(*flags, choices=registered_modes(), **common)
    elif annotation == "bool":
        group.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
    elif annotation.startswith("dict"):
        group.add_argument(*flags, type=_key_values, metavar="K=V,...", **common)
    elif annotation == "bool | str":
        group.add_argument(*flags, type=_bool_or_auto, metavar="{auto,true,false}", **common)
    elif annotation.split(" | ")[0] in ("int", "float"):
        group.add_argument(*flags, type=_number(annotation), metavar=annotation.split(" | ")[0].upper(),
                           **common)
    elif annotation == "literal":
        group.add_argument(*flags, type=_literal, metavar="VALUE", **common)
    else:
        group.add_argument(*flags, metavar="TEXT", **common)


def _number(annotation: str) -> Any:
    kind = int if annotation.startswith("int") else float
    nullable = "None" in annotation

    def parse(text: str) -> int | float | None:
        if nullable and text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}"
                                             f"{' or none' if nullable else ''}, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def _bool_or_auto(text: str) -> bool | str:
    choices: dict[str, bool | str] = {"auto": "auto", "true": True, "false": False, "1": True, "0": False}
    value = choices.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}")
    return value


def _literal(text: str) -> Any:
    """A JSON value (number, true/false, null) or, failing that, the text; ``none`` is None."""
    if text.lower() == "none":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _key_values(text: str) -> dict[str, Any]:
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON object: {exc}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("expected a JSON object")
        return value
    out = {}
    for part in filter(None, text.split(",")):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE,..., got {part!r}")
        out[key.strip()] = _literal(value.strip())
    return out


def trainer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The Trainer keywords and mode options given on the command line (the rest: defaults)."""
    names = [p.name for p in trainer_parameters()] + list(mode_options())
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def load_config(path: str | None, settings: list[str] | None) -> dict[str, Any]:
    """The script's config: the ``--config`` file (JSON; YAML when PyYAML is installed), then
    each ``--set key=value`` on top (a dotted key sets a nested value; the value is read as
    JSON when it parses, else kept as text). UsageError for anything wrong."""
    config: dict[str, Any] = {}
    if path:
        config = _read_config_file(pathlib.Path(path))
    for setting in settings or []:
        key, eq, text = setting.partition("=")
        if not eq or not key or any(not part for part in key.split(".")):
            raise UsageError(f"--set takes KEY=VALUE (a dotted KEY sets a nested value), got {setting!r}")
        where = config
        *parents, last = key.split(".")
        for part in parents:
            node = where.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {setting!r}: {part!r} is a {type(node).__name__} in the config, "
                                 "not a mapping")
            where = node
        where[last] = _literal(text) if text.lower() != "none" else None
    return config


def _read_config_file(path: pathlib.Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise UsageError(f"--config {path}: larger than {MAX_CONFIG_BYTES} bytes")
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UsageError(f"--config {path}: a YAML config needs PyYAML, which is not installed: "
                             "pip install pyyaml, or write the config as JSON") from None
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"--config {path}: not valid YAML: {exc}") from None
    elif path.suffix.lower() == ".json":
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"--config {path}: not valid JSON: {exc}") from None
    else:
        raise UsageError(f"--config {path}: name a .json file (or .yaml/.yml with PyYAML installed)")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"--config {path}: the top level must be a mapping of keys to values, "
                         f"not a {type(value).__name__}")
    return value


__all__ = ["OutputTail", "ScriptExitError", "ScriptLoop", "UsageError", "add_trainer_flags", "launch",
           "load_config", "run_script", "trainer_kwargs"]
