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


def test_run_waits_for_a_warm_under_way_so_the_two_never_import_at_once(monkeypatch):
    """``warm`` (sent to every new worker) and ``run`` land on the actor's two threads; ``run``
    must not load the loop while ``warm`` is still importing (a module imported by two threads
    at once can be seen half-initialised by one of them)."""
    import threading

    from synctrain.worker import actor as actor_mod

    order: list[str] = []
    release = threading.Event()

    def load(value, what, rank):
        if not order:  # warm's call: held until the test lets it go
            order.append("warm loads")
            assert release.wait(30)
            order.append("warm done")
        else:
            order.append("run loads")
        raise RuntimeError("stop here")  # run reports it as a failed outcome

    monkeypatch.setattr(actor_mod, "_load_from_driver", load)
    worker = _worker()
    worker._warming = threading.Lock()
    worker.spec = type("Spec", (), {"mode": "sync"})()
    worker.rank, worker.steplog, worker.session, worker._rendezvous = 0, None, None, None
    monkeypatch.setattr(TrainWorker, "node_info", lambda self: {"pid": 0})
    warm = threading.Thread(target=worker.warm, args=(b"loop",))
    warm.start()
    deadline = time.monotonic() + 30
    while not order and time.monotonic() < deadline:
        time.sleep(0.005)
    outcome: dict = {}
    run = threading.Thread(target=lambda: outcome.update(worker.run(b"loop", b"config", {}, 0)))
    run.start()
    run.join(0.5)
    assert run.is_alive() and order == ["warm loads"]  # run waits for warm's imports
    release.set()
    warm.join(30)
    run.join(30)
    assert order == ["warm loads", "warm done", "run loads"]
    assert outcome["ok"] is False and "stop here" in outcome["traceback"]
