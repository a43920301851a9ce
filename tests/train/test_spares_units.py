"""A warm spare imports what a live rank's loop imported (``TrainWorker.loop_modules`` and
``preimport``), so that taking a dead rank's place costs no imports (issue 12's spare target)."""

from __future__ import annotations

import sys
import time

from synctrain.worker.actor import TrainWorker


def _worker() -> TrainWorker:
    worker = TrainWorker.__new__(TrainWorker)  # the two methods read only the module baseline
    worker._modules_at_start = frozenset(sys.modules)
    return worker


def test_loop_modules_are_what_was_imported_since_the_worker_started():
    live = _worker()
    for name in ("wave", "colorsys"):
        sys.modules.pop(name, None)
    live._modules_at_start = frozenset(sys.modules)
    import colorsys  # noqa: F401 - "the loop" imports it
    import wave  # noqa: F401

    assert {"colorsys", "wave"} <= set(live.loop_modules())
    assert "sys" not in live.loop_modules() and "torch" not in live.loop_modules()


def test_preimport_imports_in_the_background_and_skips_what_cannot_be_imported():
    spare = _worker()
    sys.modules.pop("tabnanny", None)
    spare.preimport(["no_such_module_anywhere", "tabnanny"])  # returns at once
    deadline = time.monotonic() + 30
    while "tabnanny" not in sys.modules and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "tabnanny" in sys.modules
    assert "no_such_module_anywhere" not in sys.modules
