"""Memory is bounded in bytes, not entries (issue 17, point 3).

With 256 KB values a node used to hold 2,000 retained entries x 256 KB (520-558 MB) after a
snapshot, and everything since the last one before it (10,000 entries). Now the log held in
memory is bounded in bytes: a snapshot is due after ``--snapshot-bytes`` of applied data,
the tail kept after it is at most ``--keep-bytes-after-snapshot``, and writes are refused
(``overloaded``, retried by the client) while the log is over ``--max-retained-log-bytes``.
The test writes ~150 MB of 256 KB values and checks, while it runs, that every node's
retained log stays under its bound and that the processes' peak RSS stays far below what the
log written would take.
"""

from __future__ import annotations

import os
import pathlib
import threading

import pytest

from coordinator import Client

VALUE_BYTES = 256 << 10
WRITERS = 4
ENTRY_OVERHEAD_BYTES = 1 << 10  # an entry's key, session and framing, generously
PUTS = 600  # 150 MB of values
BOUNDS = {"snapshot_bytes": 16 << 20, "keep_bytes": 4 << 20, "retained_max": 32 << 20}
PEAK_RSS_LIMIT_BYTES = 120 << 20  # measured 69-77 MiB; the log written alone is 150 MB


def _rss_peak_bytes(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.mark.slow
@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs /proc")
def test_retained_log_and_rss_stay_bounded_with_256kb_values(make_cluster, wait_for) -> None:
    cluster = make_cluster(extra_args=[
        "--snapshot-bytes", str(BOUNDS["snapshot_bytes"]),
        "--keep-bytes-after-snapshot", str(BOUNDS["keep_bytes"]),
        "--max-retained-log-bytes", str(BOUNDS["retained_max"])])
    cluster.leader()
    seen_max = {i: 0 for i in cluster.node_ids}
    done = threading.Event()
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            with Client(cluster.endpoints, token=cluster.token, timeout_s=60) as c:
                for n in range(t, PUTS, WRITERS):
                    c.put(f"v-{n % 16}", os.urandom(VALUE_BYTES))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,), daemon=True) for t in range(WRITERS)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for i in cluster.node_ids:
            mem = (cluster.status(i) or {}).get("memory", {})
            seen_max[i] = max(seen_max[i], mem.get("retained_log_bytes", 0))
            # A write is refused once the retained log is over the bound, checked when the
            # write arrives: the writes admitted before the log grew past it still land, up
            # to one per writer, each a value and its entry's encoding (a 256 KiB-only slack
            # failed once in CI, 3.5 KB over: two writes admitted together).
            assert mem.get("retained_log_bytes", 0) <= BOUNDS["retained_max"] + WRITERS * (
                VALUE_BYTES + ENTRY_OVERHEAD_BYTES), mem
        done.wait(0.2)
    assert not errors, errors[:3]
    for i in cluster.node_ids:
        st = cluster.status(i)
        peak = _rss_peak_bytes(cluster.pid(i))
        print(f"node {i}: {st['stats']['snapshots']} snapshots, retained log max seen "
              f"{seen_max[i] >> 20} MiB (bound {BOUNDS['retained_max'] >> 20} MiB), now "
              f"{st['memory']['retained_log_bytes'] >> 20} MiB; peak RSS {peak >> 20} MiB; "
              f"writes refused for the bound: {st['stats']['writes_refused_log_full']}")
        assert st["memory"]["retained_log_bytes_max"] == BOUNDS["retained_max"]
        assert st["stats"]["snapshots"] >= 4
        assert peak < PEAK_RSS_LIMIT_BYTES, f"node {i} peaked at {peak >> 20} MiB"
    with cluster.client() as c:
        assert len(c.get("v-0")) == VALUE_BYTES
