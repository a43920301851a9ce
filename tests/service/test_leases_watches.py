"""Leases and watches (coordinator/leases.py, kvrange.events_answer, the server's long-polled
``watch``; issue 16).

The state-machine tests pin the rules every replica applies from the log alone: a lease expires
only when the log's clock has passed its expiry (a keepalive committed before the leader's
``lease.expire`` saves it), a revocation deletes its keys in one revision, and the change
history gives every event with the record before it, whole revisions at a time. The cluster
tests use real processes and real signals: keys vanish after expiry and never before, a client
that keeps its lease alive keeps its keys through a leader kill, and watchers see every
committed change exactly once, in revision order, with no gap, while nodes are killed,
paused, cut off and restarted under load.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from coordinator import (
    AsyncClient,
    Client,
    OutcomeUnknown,
    Put,
    RequestRejected,
    Unavailable,
    WatchCancelled,
    leases,
)
from coordinator.statemachine import StateMachine, encode_command


class Store:
    """A state machine fed commands the way the log would (``ts`` is the leader's clock)."""

    def __init__(self) -> None:
        self.sm = StateMachine()
        self.seq = 0
        self.sid = self.apply("register")["session"]

    def apply(self, op: str, *args, ts: int = 0, sessionless: bool = False) -> dict:
        if op == "register" or sessionless:
            data = encode_command(op, 0, 0, 0, ts, *args)
        else:
            self.seq += 1
            data = encode_command(op, self.sid, self.seq, 1, ts, *args)
        answer = self.sm.apply(self.sm.applied_index + 1, data)
        assert answer is not None
        return answer

    def expire(self, *ids: int, ts: int) -> list[int]:
        return self.apply("lease.expire", *ids, ts=ts, sessionless=True)["expired"]

    def events(self, start: bytes, from_rev: int, max_events: int = 1000, prefix: bool = True) -> dict:
        return self.sm.query("kv", "events", (start, None, prefix, from_rev, max_events))


# ------------------------------------------------------------------ the state machine
def test_a_lease_expires_on_the_logs_clock_and_a_keepalive_before_the_expiry_saves_it() -> None:
    s = Store()
    lid = s.apply("lease.grant", 2000, 0, ts=1000)["id"]
    assert s.apply("put", b"svc/a", b"1", lid, ts=1000)["ok"]
    assert s.apply("put", b"svc/b", b"2", lid, ts=1000)["ok"]
    assert s.expire(lid, ts=2999) == [] and b"svc/a" in s.sm.kv  # not due yet: a no-op
    s.apply("lease.keepalive", lid, ts=3000)  # committed before the leader's expire below
    assert s.expire(lid, ts=3100) == []  # the leader saw it due, the log says it was renewed
    assert s.sm.query("kv", "lease", (lid, True))["keys"] == [b"svc/a", b"svc/b"]
    rev = s.sm.revision
    assert s.expire(lid, ts=4999) == [] and s.expire(lid, ts=5000) == [lid]
    assert b"svc/a" not in s.sm.kv and b"svc/b" not in s.sm.kv and not s.sm.leases
    assert s.sm.revision == rev + 1  # both keys deleted in one revision
    assert s.apply("lease.keepalive", lid, ts=5100)["error"] == "lease_not_found"
    assert s.apply("put", b"svc/c", b"3", lid, ts=5100)["error"] == "lease_not_found"


@settings(max_examples=150, deadline=None)
@example([("grant", 1, 0), ("keepalive", 1, 0), ("look", 1, 300)], 5)  # one expiry pushed twice
@given(st.lists(st.tuples(st.sampled_from(["grant", "keepalive", "revoke", "expire", "look",
                                           "restore"]),
                          st.integers(1, 12), st.integers(0, 400)), max_size=80),
       st.integers(1, 5))
def test_the_leaders_expiry_heap_finds_exactly_the_due_leases(ops, limit) -> None:
    """``leases.due`` reads an expiry heap, not every lease: whatever the grants, keepalives,
    revokes, expiries and restores, it names the ``limit`` earliest-due leases a scan would
    (ties in any order), each once."""
    s, ts = Store(), 0
    for op, lid, dt in ops:
        ts += dt
        if op == "grant":
            s.apply("lease.grant", 500 + 100 * (lid % 4), lid, ts=ts)
        elif op == "keepalive":
            s.apply("lease.keepalive", lid, ts=ts)
        elif op == "revoke":
            s.apply("lease.revoke", lid, ts=ts)
        elif op == "expire":
            s.expire(*leases.due(s.sm, ts), ts=ts)
        elif op == "restore":
            back = StateMachine()
            back.restore(s.sm.snapshot())
            s.sm.replace_with(back)
        now = ts + 300
        scan = sorted((lease.expiry_ms, i) for i, lease in s.sm.leases.items()
                      if lease.expiry_ms <= now)
        assert leases.due(s.sm, now, limit) == [i for _, i in scan[:limit]]
        assert leases.due(s.sm, now, 10_000) == [i for _, i in scan]  # and nothing was lost


def test_puts_deletes_and_transactions_attach_and_detach_keys() -> None:
    s = Store()
    one = s.apply("lease.grant", 5000, 0)["id"]
    two = s.apply("lease.grant", 5000, 77)["id"]
    assert two == 77 and s.apply("lease.grant", 5000, 77)["error"] == "lease_exists"
    assert s.apply("lease.grant", 10, 0)["error"] == "bad_ttl"
    s.apply("put", b"k1", b"v", one)
    s.apply("put", b"k2", b"v", one)
    s.apply("put", b"k2", b"w")  # a put with no lease detaches the key
    s.apply("put", b"k3", b"v", one)
    s.apply("put", b"k3", b"v", two)  # moves it to the other lease
    s.apply("delete", b"k1")
    txn = s.apply("txn", [], [["put", b"k4", b"v", two], ["put", b"k5", b"v"]], [])
    assert txn["ok"], txn
    bad = s.apply("txn", [], [["put", b"k6", b"v", 999]], [])
    assert bad["error"] == "bad_txn" and b"k6" not in s.sm.kv and "999" in bad["detail"]
    assert s.sm.query("kv", "lease", (one, True))["keys"] == []
    assert s.sm.query("kv", "lease", (two, True))["keys"] == [b"k3", b"k4"]
    kvs = {kv[0]: kv[5] for kv in s.sm.query("kv", "range", (b"k", None, True))["kvs"]}
    assert kvs == {b"k2": 0, b"k3": two, b"k4": two, b"k5": 0}
    # the leases survive a snapshot, keys and all, and revoking deletes exactly their keys
    copy = StateMachine()
    copy.restore(s.sm.snapshot())
    assert copy.snapshot() == s.sm.snapshot()
    assert s.apply("lease.revoke", two)["deleted"] == 2
    assert sorted(s.sm.kv) == [b"k2", b"k5"] and list(s.sm.leases) == [one]


def test_events_carry_the_record_before_and_come_in_whole_revisions() -> None:
    s = Store()
    lid = s.apply("lease.grant", 5000, 0)["id"]
    s.apply("put", b"w/a", b"1")  # rev 1
    s.apply("put", b"w/a", b"2")  # rev 2
    s.apply("put", b"other", b"x")  # rev 3: outside the prefix
    s.apply("txn", [], [["put", b"w/b", b"3", lid], ["put", b"w/c", b"4", lid]], [])  # rev 4
    s.apply("delete", b"w/a")  # rev 5
    s.apply("lease.revoke", lid)  # rev 6: w/b and w/c together
    got = s.events(b"w/", 1)
    assert [(e[0], e[1], e[4]) for e in got["events"]] == [
        ("put", b"w/a", 1), ("put", b"w/a", 2), ("put", b"w/b", 4), ("put", b"w/c", 4),
        ("delete", b"w/a", 5), ("delete", b"w/b", 6), ("delete", b"w/c", 6)]
    second = got["events"][1]
    assert second[2] == b"2" and second[7] == [b"1", 1, 1, 1]  # the value then, and before
    assert got["events"][4][7][0] == b"2" and got["next"] == 7
    # a small page never cuts a revision in two; "next" resumes right after it
    page = s.events(b"w/", 1, max_events=3)
    assert [e[4] for e in page["events"]] == [1, 2, 4, 4] and page["next"] == 5
    rest = s.events(b"w/", page["next"], max_events=3)
    assert [e[4] for e in rest["events"]] == [5, 6, 6] and rest["next"] == 7
    assert s.events(b"w/", 0)["events"] == [] and s.events(b"w/", 0)["next"] == 7  # from now
    s.apply("compact", 4)
    gone = s.events(b"w/", 3)
    assert gone["error"] == "compacted" and gone["compact_revision"] == 5
    assert [e[4] for e in s.events(b"w/", 5)["events"]] == [5, 6, 6]


def test_a_revision_bigger_than_an_answer_is_split_and_resumed_without_a_gap() -> None:
    s = Store()
    big = b"x" * (300 << 10)
    s.apply("put", b"w/0", b"small")  # rev 1
    s.apply("txn", [], [["put", b"w/a", big], ["put", b"w/b", big], ["put", b"w/c", big]], [])  # rev 2
    s.apply("put", b"w/d", b"small")  # rev 3
    got, rev, skip, answers = [], 1, 0, 0
    while rev <= s.sm.revision:
        answer = s.sm.query("kv", "events", (b"w/", None, True, rev, 1000, skip))
        assert answer["ok"] and answer["events"], answer
        got += [(e[4], e[1]) for e in answer["events"]]
        rev, skip, answers = answer["next"], answer["skip"], answers + 1
    assert got == [(1, b"w/0"), (2, b"w/a"), (2, b"w/b"), (2, b"w/c"), (3, b"w/d")]
    assert answers >= 3  # revision 2 (900 KB) did not fit one answer


# ------------------------------------------------------------------ a real cluster

@pytest.mark.slow
def test_keys_vanish_after_the_lease_expires_and_never_before(make_cluster, wait_for) -> None:
    cluster = make_cluster()
    with cluster.client() as client:
        lid = client.grant(1.5)
        client.put("svc/one", "up", lease=lid)
        started = time.time()  # the expiry is on a leader's clock: at least this + the TTL
        client.keepalive(lid)
        gone_at: list[float] = []

        def gone() -> bool:
            if client.get("svc/one") is None:
                gone_at.append(time.time())
                return True
            return False

        wait_for(gone, "the lease's key to be deleted", timeout_s=30, interval_s=0.02)
        assert gone_at[0] >= started + 1.5, f"deleted {started + 1.5 - gone_at[0]:.3f} s early"
        with pytest.raises(RequestRejected) as info:
            client.keepalive(lid)
        assert info.value.code == "lease_not_found"
        assert lid not in client.leases()


@pytest.mark.slow
@pytest.mark.fault
def test_a_kept_alive_lease_keeps_its_keys_through_a_leader_kill(make_cluster, wait_for) -> None:
    cluster = make_cluster()
    with cluster.client(timeout_s=30) as client:
        kept = client.grant(2.0)
        client.put("svc/kept", "up", lease=kept)
        dropped = client.grant(2.0)  # nobody keeps this one alive
        client.put("svc/dropped", "up", lease=dropped)
        with client.lease_keeper(kept) as keeper:
            old = cluster.leader()
            cluster.kill(old)
            cluster.leader(exclude=(old,))
            # the new leader expires the neglected lease, never the kept one
            wait_for(lambda: client.get("svc/dropped") is None, "the neglected lease to expire")
            until = time.monotonic() + 3 * 2.0
            while time.monotonic() < until:
                assert client.get("svc/kept") == b"up", "a kept-alive lease lost its key"
                time.sleep(0.1)
            assert keeper.keepalives >= 3 and not keeper.lost.is_set()
        cluster.restart(old)
        assert client.get("svc/kept") == b"up"
        wait_for(lambda: client.get("svc/kept") is None, "the lease to expire once let go")


@pytest.mark.slow
def test_a_watcher_that_falls_behind_the_history_is_cancelled_with_the_reason(make_cluster,
                                                                            wait_for) -> None:
    cluster = make_cluster()
    with cluster.client() as client:
        first = client.put("h/a", "1")
        watch = client.watch("h/", prefix=True, start_revision=first)
        assert next(watch).kv.value == b"1"
        last = 0
        for i in range(5):
            last = client.put(f"h/{i}", str(i))
        client.compact(last)
        commit = cluster.status(cluster.leader())["commit"]
        wait_for(lambda: all((cluster.status(i) or {}).get("applied", 0) >= commit
                             for i in cluster.node_ids), "every node to apply the compaction")
        with pytest.raises(WatchCancelled) as info:
            list(watch)
        assert info.value.reason == "compacted" and info.value.compact_revision == last + 1


class _Writer:
    """Puts (and some deletes and two-key transactions) under ``w/``, recording what each
    acknowledged write did and at which revision."""

    def __init__(self, cluster) -> None:
        self.client = Client(cluster.endpoints, token=cluster.token, timeout_s=20)
        self.acked: dict[int, list[tuple[str, bytes]]] = {}  # revision -> [(type, key)]
        self.unknown = 0
        self.done = 0
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                n += 1
                key = f"w/{n % 50:02d}"
                try:
                    if n % 7 == 0:
                        r = self.client.txn([], [Put(key, f"t{n}"), Put(f"w/x{n}", "x")])
                        changes = [("put", key.encode()), ("put", f"w/x{n}".encode())]
                        rev = r.revision
                    elif n % 5 == 0:  # its revision is not returned: checked by the gap rule only
                        self.client.delete(key)
                        rev, changes = -1, []
                    else:
                        rev, changes = self.client.put(key, f"v{n}"), [("put", key.encode())]
                except OutcomeUnknown:
                    self.unknown += 1
                    continue
                except Unavailable:
                    continue
                if rev > 0:
                    self.acked[rev] = changes
                self.done += 1
                time.sleep(0.003)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(60)
        self.client.close()
        assert self.error is None, repr(self.error)


def _collect_sync(watch, out: list) -> None:
    for event in watch:
        out.append(event)


@pytest.mark.slow
@pytest.mark.fault
def test_watchers_see_every_change_once_in_order_through_kills_pauses_and_partitions(
        make_cluster, wait_for) -> None:
    cluster = make_cluster()
    blocking: list = []
    async_events: list = []
    with cluster.client(timeout_s=30) as client:
        watch = client.watch("w/", prefix=True, start_revision=1)
        t_sync = threading.Thread(target=_collect_sync, args=(watch, blocking), daemon=True)
        t_sync.start()
        loop_ready = threading.Event()
        awatches: list = []

        def run_async() -> None:
            async def main() -> None:
                async with AsyncClient(cluster.endpoints, token=cluster.token, timeout_s=30) as ac:
                    awatch = ac.watch("w/", prefix=True, start_revision=1)
                    awatches.append((asyncio.get_running_loop(), awatch))
                    loop_ready.set()
                    async for event in awatch:
                        async_events.append(event)
            asyncio.run(main())

        t_async = threading.Thread(target=run_async, daemon=True)
        t_async.start()
        assert loop_ready.wait(30)
        writer = _Writer(cluster)
        writer.thread.start()

        def progress(n: int = 40) -> None:
            target = writer.done + n
            wait_for(lambda: writer.done >= target, f"{n} more writes")

        progress()
        # every node is, in turn, killed and restarted (the watchers' own node among them)
        for node in list(cluster.node_ids):
            cluster.kill(node)
            progress()
            cluster.restart(node)
            progress()
        paused = next(i for i in cluster.node_ids if i != cluster.leader())
        cluster.pause(paused)
        progress()
        cluster.resume(paused)
        old = cluster.leader()
        cluster.partition(old)
        cluster.leader(exclude=(old,))
        progress()
        cluster.heal()
        progress()
        writer.stop()
        final = client.range("w/", prefix=True, count_only=True).revision
        wait_for(lambda: blocking and blocking[-1].revision >= final, "the blocking watcher to catch up")
        wait_for(lambda: async_events and async_events[-1].revision >= final,
                 "the async watcher to catch up")
        # cancelled from here (the async one on its own event loop): both end within one poll,
        # with no event to wake them
        watch.cancel()
        loop, awatch = awatches[0]
        loop.call_soon_threadsafe(awatch.cancel)
        t_sync.join(30)
        t_async.join(30)
        assert not t_sync.is_alive() and not t_async.is_alive(), "a cancelled watch went on"

    assert writer.done > 200, f"too little load: {writer.done} writes"
    for name, events in (("blocking", blocking), ("async", async_events)):
        events = [e for e in events if e.revision <= final]
        revisions = [e.revision for e in events]
        assert revisions == sorted(revisions), f"{name}: events out of revision order"
        pairs = [(e.revision, e.kv.key) for e in events]
        assert len(pairs) == len(set(pairs)), f"{name}: an event was delivered twice"
        # every write is under w/, so the revisions seen are exactly 1..final: no gap
        assert sorted(set(revisions)) == list(range(1, final + 1)), f"{name}: a gap in the revisions"
        by_rev: dict[int, list] = {}
        for e in events:
            by_rev.setdefault(e.revision, []).append((e.type, e.kv.key))
        for rev, changes in writer.acked.items():
            assert sorted(by_rev.get(rev, [])) == sorted(changes), f"{name}: revision {rev}"
    print(f"{writer.done} writes ({writer.unknown} unknown), {final} revisions, "
          f"{len(blocking)} + {len(async_events)} events")
