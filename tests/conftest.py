"""Shared test fixtures.

* One Ray instance per test session (``ray_session``), started with explicit CPUs and shut down
  at the end; tests that need Ray take the fixture (or a fixture that depends on it).
* Test modules are pickled *by value* for Ray: tests run with ``--import-mode=importlib`` so
  their modules are not importable by name inside Ray workers; shipping them by value lets a
  training loop defined in a test file run in a worker.
* ``gpu``-marked tests are skipped when no CUDA device is present.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

RAY_NUM_CPUS = 4  # logical CPUs: 2-4 small workers (+ 0-CPU helper actors) on a 2-core machine


@pytest.fixture(scope="session", autouse=True)
def _job_storage(tmp_path_factory):
    """Jobs a test runs without storage_path= go to a temporary directory, not ~/synctrain_results."""
    if not os.environ.get("SYNCTRAIN_STORAGE_PATH"):
        os.environ["SYNCTRAIN_STORAGE_PATH"] = str(tmp_path_factory.mktemp("synctrain_results"))
    yield


#: Set by `synctrain run`/`resume` in the process that runs them; a test that calls the CLI's
#: functions in the test process must not hand them on to later tests (a leaked job name made
#: every later Trainer resume one job).
_CLI_ENV = ("SYNCTRAIN_JOB_NAME", "SYNCTRAIN_LAUNCH", "SYNCTRAIN_STORAGE_PATH", "RAY_ADDRESS")


@pytest.fixture(autouse=True)
def _restore_cli_environment():
    saved = {name: os.environ.get(name) for name in _CLI_ENV}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def pytest_collection_finish(session: pytest.Session) -> None:
    try:
        import ray.cloudpickle as cp
    except ImportError:  # pragma: no cover
        return
    seen: set[str] = set()
    for item in session.items:
        module = getattr(item, "module", None)
        if module is None or module.__name__ in seen or module.__name__ not in sys.modules:
            continue
        seen.add(module.__name__)
        cp.register_pickle_by_value(module)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU (none on this machine)")


@pytest.fixture(scope="session")
def ray_session():
    import ray
    import torch

    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        # GPUs counted by torch, not left to Ray's detection (which reads NVML and may find none
        # in a container where CUDA works).
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        # address="local": a private Ray, never a test cluster (ray.cluster_utils) another test
        # left running or a `ray start` one
        ray.init(address="local", num_cpus=RAY_NUM_CPUS, num_gpus=gpus, include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def sigkill_when_written():
    """``start(pid_file)``: a thread that waits (polling, up to 120 s) for a worker to write its
    pid into ``pid_file`` and then kills that process with SIGKILL. Yields ``start``; joins the
    threads at the end."""
    threads: list[threading.Thread] = []

    def start(pid_file: os.PathLike[str] | str) -> None:
        def kill() -> None:
            deadline = time.monotonic() + 120
            while not os.path.exists(pid_file) and time.monotonic() < deadline:
                time.sleep(0.05)
            with open(pid_file) as f:
                os.kill(int(f.read()), signal.SIGKILL)

        thread = threading.Thread(target=kill, daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    for thread in threads:
        thread.join(5)


@pytest.fixture(scope="session")
def benchmark_module():
    """Import a script of ``benchmarks/`` by module name (``benchmarks/`` and ``examples/``,
    which the scripts import from, put on ``sys.path``)."""
    root = Path(__file__).resolve().parents[1]

    def load(name: str):
        for sub in ("benchmarks", "examples"):
            if str(root / sub) not in sys.path:
                sys.path.insert(0, str(root / sub))
        return importlib.import_module(name)

    return load
