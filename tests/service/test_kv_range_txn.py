"""Ranges and transactions over the key-value store (coordinator/kvrange.py, issue 16): sorted
and paged ranges (single key, interval, prefix, everything; limit, keys_only, count_only), a
past revision refused clearly, etcd's comparison rules, one revision per transaction, checked
whole before anything applies, exactly once; then the same through a real cluster's client."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator import Compare, Delete, Get, Put, RequestRejected
from coordinator.kvrange import prefix_end
from coordinator.statemachine import StateMachine, encode_command


class Store:
    def __init__(self) -> None:
        self.sm = StateMachine()
        self.seq = 0
        self.sid = self.apply("register")["session"]

    def apply(self, op: str, *args) -> dict:
        if op == "register":
            data = encode_command("register", 0, 0, 0, 0)
        else:
            self.seq += 1
            data = encode_command(op, self.sid, self.seq, 1, 0, *args)
        answer = self.sm.apply(self.sm.applied_index + 1, data)
        assert answer is not None
        return answer

    def put(self, key: bytes, value: bytes = b"v") -> int:
        return self.apply("put", key, value)["revision"]

    def range(self, *args) -> dict:
        return self.sm.query("kv", "range", args)

    def keys(self, *args) -> list[bytes]:
        return [kv[0] for kv in self.range(*args)["kvs"]]


def test_prefix_end() -> None:
    assert prefix_end(b"job/") == b"job0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"  # no key is after every one: no upper bound


def test_ranges_are_sorted_and_bounded_as_asked() -> None:
    s = Store()
    for key in (b"b/2", b"a", b"b/1", b"c", b"b/10", b"b"):
        s.put(key)
    assert s.keys(b"b/", None, True) == [b"b/1", b"b/10", b"b/2"]
    assert s.keys(b"b", b"c") == [b"b", b"b/1", b"b/10", b"b/2"]
    assert s.keys(b"b", b"\0") == [b"b", b"b/1", b"b/10", b"b/2", b"c"]
    assert s.keys(b"", None, True) == [b"a", b"b", b"b/1", b"b/10", b"b/2", b"c"]
    assert s.keys(b"c") == [b"c"] and s.keys(b"zz") == []
    one = s.range(b"b/1")["kvs"][0]
    assert one == [b"b/1", b"v", 3, 3, 1, 0]  # key, value, create, mod, version, lease
    page = s.range(b"", None, True, 2)
    assert [kv[0] for kv in page["kvs"]] == [b"a", b"b"] and page["more"] and page["count"] == 6
    rest = s.range(b"b\0", b"\0", False, 0)  # the next page: after the last key returned
    assert [kv[0] for kv in rest["kvs"]] == [b"b/1", b"b/10", b"b/2", b"c"] and not rest["more"]
    assert s.range(b"b/", None, True, 0, True)["kvs"][0][1] is None  # keys_only
    counted = s.range(b"b/", None, True, 0, False, True)
    assert counted["kvs"] == [] and counted["count"] == 3 and counted["more"] is False
    assert s.range(b"a")["revision"] == 6


def test_the_sorted_index_follows_creations_and_deletions() -> None:
    s = Store()
    s.put(b"k2")
    assert s.keys(b"k", None, True) == [b"k2"]
    s.put(b"k1")
    s.apply("delete", b"k2")
    s.put(b"k3")
    assert s.keys(b"k", None, True) == [b"k1", b"k3"]
    restored = StateMachine()
    restored.restore(s.sm.snapshot())
    assert restored.query("kv", "range", (b"k", None, True))["kvs"] == s.range(b"k", None, True)["kvs"]


def test_bad_ranges_and_a_past_revision_are_refused_clearly() -> None:
    s = Store()
    s.put(b"a")
    s.put(b"a")
    for args, what in (((b"",), "empty key"), ((b"a", b"b", True), "not both"), (("a",), "bytes"),
                       ((b"a", None, False, -1), "limit")):
        answer = s.range(*args)
        assert answer["error"] == "bad_range" and what in answer["detail"], (args, answer)
    future = s.range(b"a", None, False, 0, False, False, 3)
    assert future["error"] == "future_revision" and "ahead" in future["detail"]
    assert s.range(b"a", None, False, 0, False, False, 2)["ok"]  # the current one is fine
    assert s.sm.query("kv", "scan", ())["error"] == "bad_query"


def test_a_transaction_runs_one_branch_atomically_at_one_revision() -> None:
    s = Store()
    s.put(b"leader", b"n1")  # revision 1
    s.put(b"lock/a")  # 2
    ok = s.apply("txn", [[b"leader", "value", "==", b"n1"], [b"leader", "version", "==", 1]],
                 [["put", b"leader", b"n2"], ["put", b"term", b"2"], ["delete", b"lock/", None, True],
                  ["get", b"leader", None, False, 0, False, False]],
                 [["put", b"lost", b"1"]])
    assert ok["ok"] and ok["succeeded"] and ok["revision"] == 3, ok
    put, put2, deleted, got = ok["responses"]
    assert put == {"op": "put", "revision": 3} and put2["revision"] == 3
    assert deleted == {"op": "delete", "deleted": 1}
    assert got["kvs"] == [[b"leader", b"n2", 1, 3, 2, 0]] and got["revision"] == 3
    no = s.apply("txn", [[b"leader", "value", "==", b"n1"]], [["put", b"x", b"1"]],
                 [["get", b"leader", None, False, 0, False, False]])
    assert no["succeeded"] is False and no["revision"] == 3, "a read-only branch makes no revision"
    assert no["responses"][0]["kvs"][0][1] == b"n2"
    assert s.sm.get(b"x") is None and s.sm.get(b"lost") is None


def test_comparisons_follow_etcd_on_missing_keys() -> None:
    s = Store()
    s.put(b"k", b"5")

    def holds(*c) -> bool:
        return s.apply("txn", [list(c)], [], [])["succeeded"]

    assert holds(b"missing", "version", "==", 0) and holds(b"missing", "create", "==", 0)
    assert not holds(b"missing", "value", "==", b"") and not holds(b"missing", "value", "!=", b"x")
    assert holds(b"k", "value", ">", b"4") and holds(b"k", "value", "<", b"6")
    assert holds(b"k", "mod", "==", 1) and not holds(b"k", "version", ">", 1)


def test_a_bad_transaction_changes_nothing() -> None:
    s = Store()
    s.put(b"a")
    before = (s.sm.revision, dict(s.sm.kv))
    for compare, success, what in (
            ([[b"a", "size", "==", 1]], [], "target"),
            ([[b"a", "version", "==", b"1"]], [], "integer"),
            ([], [["put", b"b", b"1"], ["put", b"b", b"2"]], "at most once"),
            ([], [["put", b"b", b"1"], ["rename", b"a"]], "transaction op"),
            ([], [["put", b"c", b"1"], ["get", b"", None, False, 0, False, False]], "empty key")):
        answer = s.apply("txn", compare, success, [])
        assert answer["error"] == "bad_txn" and what in answer["detail"], (what, answer)
        assert (s.sm.revision, dict(s.sm.kv)) == before


def test_a_retried_transaction_applies_once() -> None:
    s = Store()
    data = encode_command("txn", s.sid, 7, 1, 0, [], [["put", b"n", b"1"]], [])
    first = s.sm.apply(s.sm.applied_index + 1, data)
    again = s.sm.apply(s.sm.applied_index + 1, data)
    assert first == again and s.sm.get(b"n").version == 1


def test_a_range_at_a_past_revision_undoes_the_newer_changes() -> None:
    s = Store()
    s.put(b"a", b"1")  # 1
    s.put(b"b", b"1")  # 2
    s.put(b"a", b"2")  # 3
    s.apply("delete", b"b")  # 4
    s.apply("txn", [], [["put", b"c", b"1"], ["put", b"a", b"3"]], [])  # 5, both keys
    at = {rev: s.range(b"", None, True, 0, False, False, rev) for rev in range(1, 6)}
    assert [[kv[:2] for kv in at[r]["kvs"]] for r in range(1, 6)] == [
        [[b"a", b"1"]],
        [[b"a", b"1"], [b"b", b"1"]],
        [[b"a", b"2"], [b"b", b"1"]],
        [[b"a", b"2"]],
        [[b"a", b"3"], [b"c", b"1"]]]
    assert at[3]["kvs"][0] == [b"a", b"2", 1, 3, 2, 0] and at[3]["revision"] == 3
    assert s.range(b"b", None, False, 0, False, False, 3)["kvs"][0][:2] == [b"b", b"1"]
    compacted = s.apply("compact", 3)
    assert compacted["compacted"] == 3
    old = s.range(b"a", None, False, 0, False, False, 2)
    assert old["error"] == "compacted" and "starts at 3" in old["detail"]
    assert s.range(b"", None, True, 0, False, False, 3)["count"] == 2  # 3 itself is still readable
    assert s.apply("compact", 9)["error"] == "bad_command"
    restored = StateMachine()
    restored.restore(s.sm.snapshot())
    assert restored.compacted == 3 and list(restored.history) == list(s.sm.history)
    assert restored.query("kv", "range", (b"", None, True, 0, False, False, 4))["kvs"] == \
        s.range(b"", None, True, 0, False, False, 4)["kvs"]


def test_the_history_is_bounded_and_compacts_itself(monkeypatch) -> None:
    from coordinator import statemachine

    monkeypatch.setattr(statemachine, "MAX_HISTORY_EVENTS", 5)
    s = Store()
    for i in range(12):
        s.put(b"k", b"%d" % i)
    assert len(s.sm.history) == 5 and s.sm.compacted == 7
    assert s.range(b"k", None, False, 0, False, False, 7)["kvs"][0][1] == b"6"
    assert s.range(b"k", None, False, 0, False, False, 6)["error"] == "compacted"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=3)), max_size=40),
       st.binary(max_size=2), st.integers(min_value=0, max_value=5))
def test_a_range_is_the_sorted_slice_of_a_model(ops, prefix, limit) -> None:
    s, model = Store(), {}
    for is_put, key in ops:
        if is_put:
            s.put(key)
            model[key] = True
        else:
            s.apply("delete", key)
            model.pop(key, None)
    want = sorted(k for k in model if k.startswith(prefix))
    if not prefix:
        answer = s.range(b"", None, True, limit)
    else:
        answer = s.range(prefix, None, True, limit)
    got = [kv[0] for kv in answer["kvs"]]
    assert got == (want[:limit] if limit else want) and answer["count"] == len(want)
    assert answer["more"] == (len(got) < len(want))


def test_range_and_txn_through_a_cluster(make_cluster) -> None:
    cluster = make_cluster(3)
    with cluster.client() as c:
        for i in range(5):
            c.put(f"jobs/{i}", f"v{i}")
        c.put("other", "x")
        page = c.range("jobs/", prefix=True, limit=3)
        assert [kv.key for kv in page.kvs] == [b"jobs/0", b"jobs/1", b"jobs/2"] and page.more
        rest = c.range(page.next_start, b"\0")
        assert [kv.key for kv in rest.kvs] == [b"jobs/3", b"jobs/4", b"other"]
        assert c.range("jobs/", prefix=True, count_only=True, consistency="stale").count == 5
        assert c.range("jobs/", prefix=True, revision=2).count == 2  # as of the second put
        try:
            c.range("jobs/0", revision=10**6)
        except RequestRejected as exc:
            assert exc.code == "future_revision"
        else:
            raise AssertionError("a revision ahead of the store must be refused")
        won = c.txn([Compare("leader", "create", "==", 0)], [Put("leader", "me"), Get("jobs/", prefix=True)],
                    [Get("leader")])
        assert won.succeeded and won.responses[1].count == 5
        lost = c.txn([Compare("leader", "create", "==", 0)], [Put("leader", "you")], [Get("leader")])
        assert not lost.succeeded and lost.responses[0].kvs[0].value == b"me"
        gone = c.txn([Compare("leader", "value", "==", "me")], [Delete("jobs/", prefix=True)])
        assert gone.succeeded and gone.responses[0]["deleted"] == 5
        assert c.range("jobs/", prefix=True).count == 0 and c.get("other") == b"x"


def test_the_cli_reads_ranges_and_runs_transactions(make_cluster) -> None:
    import base64
    import json
    import os
    import subprocess
    import sys

    cluster = make_cluster(3)
    env = dict(os.environ, COORDINATOR_ENDPOINTS=",".join(cluster.endpoints),
               COORDINATOR_TOKEN_FILE=str(cluster.token_file))

    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], env=env, input=stdin,
                              capture_output=True, text=True, timeout=120)

    for key in ("cfg/b", "cfg/a", "zz"):
        assert cli("put", key, key.upper()).returncode == 0
    simple = cli("get", "cfg/", "--prefix")
    assert simple.returncode == 0 and simple.stdout.split() == ["cfg/a", "CFG/A", "cfg/b", "CFG/B"]
    doc = json.loads(cli("get", "cfg/", "--prefix", "-w", "json", "--limit", "1").stdout)
    assert [base64.b64decode(kv["key"]) for kv in doc["kvs"]] == [b"cfg/a"] and doc["more"] and doc["count"] == 2
    assert cli("get", "cfg/", "--prefix", "--count-only").stdout.strip() == "2"
    assert cli("get", "cfg/b", "--from-key", "--keys-only").stdout.split() == ["cfg/b", "zz"]
    table = cli("get", "cfg/", "--prefix", "-w", "table")
    assert [c.strip() for c in table.stdout.splitlines()[0].split(" | ")][:2] == ["KEY", "VALUE"]
    assert "2 keys" in table.stderr and "CFG/B" in table.stdout
    missing = cli("get", "nothing/", "--prefix")
    assert missing.returncode == 3 and "no key matches" in missing.stderr
    txn = {"compare": [{"key": "zz", "target": "value", "op": "==", "value": "ZZ"}],
           "success": [{"put": {"key": "zz", "value": "new"}}, {"delete": {"key": "cfg/", "prefix": True}}],
           "failure": [{"get": {"key": "zz"}}]}
    ran = cli("txn", "-", stdin=json.dumps(txn))
    assert ran.returncode == 0 and ran.stdout.split() == ["SUCCESS", "OK", "2"], ran.stdout + ran.stderr
    again = json.loads(cli("txn", json.dumps(txn), "-w", "json").stdout)
    assert again["succeeded"] is False and base64.b64decode(again["responses"][0]["kvs"][0]["value"]) == b"new"
    assert cli("get", "zz", "--rev", "3").stdout.split() == ["zz", "ZZ"]  # before the txn (4)
    assert cli("get", "cfg/", "--prefix", "--rev", "3", "--count-only").stdout.strip() == "2"
    assert "starts at revision 4" in cli("compact", "4").stdout
    old = cli("get", "zz", "--rev", "3")
    assert old.returncode == 1 and "compacted" in old.stderr
    bad = cli("txn", '{"compare": [{"key": "zz"}]}')
    assert bad.returncode == 2 and "a transaction is JSON" in bad.stderr


def test_endpoint_health_and_status_name_a_node_that_is_down(make_cluster) -> None:
    """etcdctl's ``endpoint health|status`` (issue 16): every node, healthy ones say so; a
    killed node is unhealthy and the command's exit status says it."""
    import json
    import os
    import subprocess
    import sys

    cluster = make_cluster(3)
    env = dict(os.environ, COORDINATOR_ENDPOINTS=",".join(cluster.endpoints),
               COORDINATOR_TOKEN_FILE=str(cluster.token_file))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "coordinator.cli", "--timeout", "3", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    with cluster.client() as c:
        c.put("k", "v")
        rows = c.endpoint_status()
        assert [r["id"] for r in rows] == [1, 2, 3] and sum(r["is_leader"] for r in rows) == 1
        assert next(r for r in rows if r["is_leader"])["revision"] == 1, rows  # the put
        assert all(h["health"] for h in c.endpoint_health())
    healthy = cli("endpoint", "health")
    assert healthy.returncode == 0 and healthy.stdout.count("is healthy") == 3, healthy.stdout + healthy.stderr
    table = cli("endpoint", "status", "-w", "table").stdout.splitlines()
    assert table[0].split()[:3] == ["ENDPOINT", "|", "ID"] and len(table) == 4
    victim = next(i for i in (1, 2, 3) if i != cluster.leader())
    cluster.kill(victim)
    health = json.loads(cli("endpoint", "health", "-w", "json").stdout)
    down = [h for h in health if not h["health"]]
    assert [h["endpoint"] for h in down] == [cluster.endpoint(victim)] and down[0]["error"], health
    assert cli("endpoint", "health").returncode == 1
    assert cli("endpoint", "status").returncode == 1


def _multikey_op(client, t: int, n: int, rng, keys: list[str], seen: dict):
    """One random operation; returns (kind, model input, call that returns the model output)."""
    from coordinator.testing.history import OpKind

    roll = rng.random()
    key = rng.choice(keys)
    value = f"{t}:{n}"
    if roll < 0.25:
        return key, OpKind.WRITE, value, lambda: client.put(key, value) and None
    if roll < 0.45:
        return key, OpKind.READ, None, lambda: _text(client.get(key))
    if roll < 0.65:
        def scan():
            return tuple((kv.key.decode(), kv.value.decode()) for kv in client.range("lin/", prefix=True).kvs)
        return "*", OpKind.RANGE, ("lin/", "lin0"), scan
    # move: if key holds what this client last saw, write it and another key; else read both
    other = rng.choice([k for k in keys if k != key])
    was = seen.get(key)
    compare = ("absent", key) if was is None else ("value", key, was)
    wire = Compare(key, "version", "==", 0) if was is None else Compare(key, "value", "==", was)
    inp = ((compare,), (("put", key, value), ("put", other, value)), (("get", key), ("get", other)))

    def txn():
        r = client.txn([wire], [Put(key, value), Put(other, value)], [Get(key), Get(other)])
        got = () if r.succeeded else tuple(_text(g.kvs[0].value) if g.kvs else None for g in r.responses)
        return (r.succeeded, got)
    return "*", OpKind.TXN, inp, txn


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode()


@pytest.mark.slow
def test_ranges_and_transactions_are_linearizable_through_a_leader_kill(make_cluster, timed_call) -> None:
    """Three clients mix puts, gets, ranges and two-key transactions on three keys while the
    leader is killed and restarted; the whole history is checked against one multi-key store
    (a range that saw half a transaction, or a stale one, would fail it)."""
    import random
    import threading
    import time

    from coordinator.testing.history import Operation, OpKind
    from coordinator.testing.linearizability import CheckResult, MultiKeyModel, check_multikey

    cluster = make_cluster(3)
    keys = ["lin/k0", "lin/k1", "lin/k2"]
    history: list = []
    lock = threading.Lock()
    done = [0]
    stop = threading.Event()

    def run(t: int) -> None:
        rng = random.Random(t)
        seen: dict = {}
        with cluster.client(timeout_s=20) as client:
            for n in range(400):
                if stop.is_set():
                    break
                key, kind, inp, call = _multikey_op(client, t, n, rng, keys, seen)
                timed = timed_call(call)
                if timed is None:
                    continue
                out, unknown, start, end = timed
                if kind is OpKind.READ and not unknown:
                    seen[key] = out
                elif kind is OpKind.RANGE and not unknown:
                    seen.update(dict(out))
                with lock:
                    history.append(Operation(len(history), t, key, kind, inp, out, start, end, unknown))
                    done[0] += 1

    threads = [threading.Thread(target=run, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    def wait_done(target: int) -> None:
        deadline = time.monotonic() + 60
        while done[0] < target and time.monotonic() < deadline and any(th.is_alive() for th in threads):
            time.sleep(0.02)

    wait_done(60)
    old = cluster.leader()
    cluster.kill(old)
    cluster.leader(exclude=(old,))
    wait_done(done[0] + 40)  # the survivors serve ranges and transactions
    cluster.restart(old)
    wait_done(done[0] + 40)
    stop.set()
    for th in threads:
        th.join(120)
    kinds = [op.kind for op in history if not op.unknown]
    txns = [op.output[0] for op in history if op.kind is OpKind.TXN and not op.unknown]
    assert kinds.count(OpKind.RANGE) > 10 and len(txns) > 10, "too few ranges or transactions"
    assert any(txns) and not all(txns), "both branches of the transactions must have run"
    report = check_multikey(history, MultiKeyModel(keys), time_limit_s=120)
    assert report.result is CheckResult.OK, report.explanation
