"""The recovery policy, driven by scripts of faults (tests/train/testdata/policy.txt), and the
stall-blame rule. Pure: no Ray. ``REWRITE=1`` regenerates the expected decisions."""

from __future__ import annotations

import os
import pathlib

import pytest

from synctrain.driver.policy import Action, Failure, RecoveryPolicy, Survivor, blame_stalled

SCRIPT = pathlib.Path(__file__).parent / "testdata" / "policy.txt"


def _kv(words: list[str]) -> dict[str, str]:
    return dict(w.split("=", 1) if "=" in w else (w, "1") for w in words)


def _render(decision) -> str:
    if decision is None:
        return "none"
    out = [decision.action.value, f"recovery={decision.recovery}"]
    if decision.action is Action.SHRINK:
        out.append(f"drop={decision.drop}")
    elif decision.action is Action.GROW:
        out.append(f"add={decision.add}")
    elif decision.action is not Action.GIVE_UP:
        out.append(f"replace={decision.replace}")
    if decision.action is Action.HEAL_FROM_PEER:
        out += [f"source={decision.source_rank}", f"start={decision.start_step}"]
    if decision.action is Action.GIVE_UP:
        out.append(f"reason={decision.reason}")
    return " ".join(out)


def _run_script(text: str) -> str:
    """Run every block; return the script with the decisions filled in."""
    out: list[str] = []
    policy = None
    failures: list[Failure] = []
    survivors: list[Survivor] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        words = line.split()
        i += 1
        if not words or words[0].startswith("#"):
            continue
        cmd, args = words[0], _kv(words[1:])
        if cmd == "policy":
            mode = words[1]
            policy = RecoveryPolicy(mode, max_failures=int(args.get("max_failures", 3)),
                                    recovery=args.get("recovery", "auto"), sharded_state="sharded" in args,
                                    num_workers=int(args["num_workers"]) if "num_workers" in args else None,
                                    min_workers=int(args["min_workers"]) if "min_workers" in args else None)
        elif cmd == "fail":
            failures.append(Failure(words[1], int(args["rank"]) if "rank" in args else None,
                                    int(args["step"]) if "step" in args else None, fatal="fatal" in args,
                                    detail=words[1]))
        elif cmd == "survivor":
            survivors.append(Survivor(int(words[1]), int(args["step"]), "torn" not in args))
        elif cmd in ("decide", "unplaced", "capacity"):
            assert policy is not None
            if cmd == "decide":
                decision = policy.decide(failures, survivors)
                failures, survivors = [], []
            elif cmd == "unplaced":
                decision = policy.unplaced(tuple(int(r) for r in args["ranks"].split(",")), int(args["world"]))
            else:
                decision = policy.capacity(int(args["world"]), int(args["ready"]))
            assert lines[i] == "----", f"line {i + 1}: expected ---- after {cmd}"
            out.append("----")
            out.append(_render(decision))
            i += 2  # skip the old expectation
    return "\n".join(out) + "\n"


def test_policy_scripts():
    text = SCRIPT.read_text()
    got = _run_script(text)
    if os.environ.get("REWRITE"):
        SCRIPT.write_text(got)
    assert got == text


@pytest.mark.parametrize("ranks, blamed", [
    ([(1, False, 10, True), (0, True, 10, True), (2, True, 10, True)], [1]),  # the stopped process
    # the one waited on stopped after the others began to wait: not idle long enough yet, but
    # silent — it is the cause, not the rank that waited longest (async with a staleness bound)
    ([(0, True, 32, True), (1, False, 30, False)], [1]),
    ([(0, True, 10, True), (1, True, 7, True), (2, True, 9, True)], [1]),  # the one waited for
    ([(0, True, 10, True), (1, True, 10, True)], [0, 1]),  # level: no way to tell, all of them
    ([(0, True, 10, False), (1, False, 10, False)], []),  # nobody idle too long yet
    ([], []),
])
def test_blame_stalled(ranks, blamed):
    assert blame_stalled(ranks) == blamed


def test_decide_counts_every_failure_towards_the_limit():
    policy = RecoveryPolicy("async", max_failures=2)
    assert policy.decide([Failure("died", 0), Failure("died", 1)], []).action is Action.CONTINUE
    assert policy.decide([Failure("died", 0)], []).action is Action.GIVE_UP


def _shell_with(ranks, stall_timeout_s=6.0):
    import types

    from synctrain.driver.shell import JobShell

    shell = JobShell.__new__(JobShell)  # only what the stall check reads
    shell.ranks, shell.trainer = ranks, types.SimpleNamespace(stall_timeout_s=stall_timeout_s)
    return shell


def test_a_rank_frozen_before_a_poll_saw_it_start_is_stalled_without_the_startup_grace():
    """Rank 1 ran its first steps between two polls and froze (no poll ever said it started):
    it has not answered for the whole stall timeout, so the startup grace (minutes) does not
    shield it, and rank 0, which waits on it, is not the one blamed. CI saw the old rule let
    the async peer time out first."""
    import time

    from synctrain.driver.shell import _Rank

    now = time.monotonic()
    live = _Rank(actor=None, run=object(), started=True, step=30, last_answer=now, last_activity=now - 10)
    frozen = _Rank(actor=None, run=object(), started=False, step=None, answered=False,
                   last_answer=now - 10, last_activity=now - 10)
    failures = _shell_with({0: live, 1: frozen})._stalls(set())
    assert [(f.kind, f.rank) for f in failures] == [("stalled", 1)]


def test_a_starting_rank_that_answers_keeps_its_grace_and_its_waiting_peer_is_not_blamed():
    import time

    from synctrain.driver.shell import _Rank

    now = time.monotonic()
    live = _Rank(actor=None, run=object(), started=True, step=3, last_answer=now, last_activity=now - 10)
    starting = _Rank(actor=None, run=object(), started=False, last_answer=now - 1, last_activity=now - 10)
    assert _shell_with({0: live, 1: starting})._stalls(set()) == []


def test_a_stopped_process_gets_no_startup_grace(tmp_path):
    """A real child process stopped with SIGSTOP is stalled even before its silence lasts the
    whole timeout: state T in /proc says it is not busy starting."""
    import signal
    import subprocess
    import sys
    import time

    from synctrain.driver.shell import _Rank, _stopped

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not _stopped(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        now = time.monotonic()
        frozen = _Rank(actor=None, run=object(), started=False, pid=child.pid, answered=False,
                       last_answer=now - 4, last_activity=now - 7)
        assert [(f.kind, f.rank) for f in _shell_with({1: frozen})._stalls(set())] == [("stalled", 1)]
    finally:
        child.kill()
        child.wait()


def test_a_coordinator_node_that_cannot_be_restarted_is_counted_once(monkeypatch):
    """Its Ray node is gone (its WAL and address were that host's): every restart fails. The
    driver tries NODE_RESTART_TRIES times, then leaves it down; its death stays one failure
    however often the driver looks again (CI once saw each look count another, and a job that
    had lost one Ray node end past max_failures)."""
    import types

    from synctrain.driver import shell as shell_module
    from synctrain.driver.shell import JobShell

    monkeypatch.setattr(shell_module.time, "sleep", lambda s: None)
    tries = []

    def restart(node):
        tries.append(node)
        raise RuntimeError("The actor is not schedulable: the node specified via "
                           "NodeAffinitySchedulingStrategy doesn't exist any more")

    shell = JobShell.__new__(JobShell)
    shell.coordinator = types.SimpleNamespace(dead_nodes=lambda wait_s: [1], restart=restart)
    shell.policy = RecoveryPolicy("sync", max_failures=3)
    shell._restarting, shell._unrestartable, shell._restart_threads = set(), set(), []
    recorded = []
    shell._record_failure = lambda f, decision: recorded.append(f.kind) or len(recorded) - 1
    shell._give_up = lambda failures, decision: pytest.fail(f"gave up: {decision.reason}")
    for _ in range(5):
        shell._check_coordinator(restart_now=True)
    assert recorded == ["coordinator_node_died"]
    assert tries == [1] * shell_module.NODE_RESTART_TRIES and shell._unrestartable == {1}
