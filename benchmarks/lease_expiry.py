"""What a leader's look for due leases costs: the expiry heap against a scan of every lease.

    python benchmarks/lease_expiry.py [--leases 1000,10000,100000] [--looks 200] [--out DIR]

A leader looks for due leases every 4 ticks (60 ms at the service's default 15 ms tick) while
it holds any (:meth:`coordinator.server.CoordinatorServer._expire_leases`). For each count of
leases, one state machine is given that many leases (granted through the log's commands, TTLs
spread over 1-100 s, with the clock before the first expiry, so a look finds none due: the
steady state) and then, side by side in one process, timed: ``leases.due`` (the expiry heap)
and the scan it replaced (every lease's expiry compared). Best of ``--looks`` of each (other
work on a shared machine only ever adds to a time). Then the same after a keepalive of every
lease (the heap holds a stale entry per lease until its old expiry passes). Results in
``DIR/lease_expiry.{json,md}`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, best_of, machine, markdown_table, write_results  # noqa: E402

from coordinator import leases  # noqa: E402
from coordinator.statemachine import StateMachine, encode_command  # noqa: E402

TICKS_PER_LOOK = 4
DEFAULT_TICK_MS = 15.0


def scan(sm: StateMachine, now_ms: int, limit: int = leases.MAX_EXPIRE_BATCH) -> list[int]:
    """The look before the heap: every lease's expiry compared, in grant order."""
    out = []
    for lid, lease in sm.leases.items():
        if lease.expiry_ms <= now_ms:
            out.append(lid)
            if len(out) >= limit:
                break
    return out


def best_us(fn: Any, looks: int) -> float:
    return best_of(fn, looks) * 1e6


def measure(n: int, looks: int) -> list[dict[str, Any]]:
    sm = StateMachine()
    index = 1
    sid = sm.apply(index, encode_command("register", 0, 0, 0, 0))["session"]
    for i in range(n):
        index += 1
        ttl_ms = 1000 + (i * 7919) % 99_000
        sm.apply(index, encode_command("lease.grant", sid, i + 1, i + 1, 0, ttl_ms, i + 1))
    now = 999  # before the first expiry: nothing due
    rows = []
    for phase in ("granted", "all kept alive once"):
        if phase != "granted":
            for i in range(n):
                index += 1
                sm.apply(index, encode_command("lease.keepalive", sid, n + i + 1, n + i + 1, 10,
                                               i + 1))
            now = 1009
        assert leases.due(sm, now) == scan(sm, now) == []
        heap_us = best_us(lambda at=now: leases.due(sm, at), looks)
        scan_us = best_us(lambda at=now: scan(sm, at), looks)
        per_s = 1000.0 / (TICKS_PER_LOOK * DEFAULT_TICK_MS)
        rows.append({"leases": n, "phase": phase, "heap_entries": len(sm.lease_heap or ()),
                     "heap_us": round(heap_us, 2), "scan_us": round(scan_us, 1),
                     "speedup": round(scan_us / heap_us, 1),
                     "scan_core_pct_at_default_tick": round(scan_us * per_s / 1e4, 2),
                     "heap_core_pct_at_default_tick": round(heap_us * per_s / 1e4, 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--leases", default="1000,10000,100000")
    ap.add_argument("--looks", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.leases.split(",")]
    if any(not 1 <= c <= leases.MAX_LEASES for c in counts) or args.looks < 1:
        ap.error(f"--leases takes counts in 1..{leases.MAX_LEASES}; --looks at least 1")
    rows = []
    for n in counts:
        rows += measure(n, args.looks)
        print(f"[lease_expiry] {n} leases: {rows[-2]['scan_us']} us scan vs {rows[-2]['heap_us']} us heap",
              flush=True)
    command = "python benchmarks/lease_expiry.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = ["# A leader's look for due leases: expiry heap vs scan", "",
          f"Best of {args.looks} looks each, side by side in one process, none due (the steady "
          f"state). A leader looks every {TICKS_PER_LOOK} ticks: the last two columns are the share "
          f"of one core that takes at the service's default {DEFAULT_TICK_MS:g} ms tick. Command: "
          f"`{command.strip()}`.", "",
          markdown_table(["leases", "state", "heap entries", "heap (us)", "scan (us)", "scan / heap",
                          "scan, % of a core", "heap, % of a core"],
                         [[r["leases"], r["phase"], r["heap_entries"], r["heap_us"], r["scan_us"],
                           r["speedup"], r["scan_core_pct_at_default_tick"],
                           r["heap_core_pct_at_default_tick"]] for r in rows])]
    write_results("lease_expiry", {"machine": machine(), "looks": args.looks, "rows": rows},
                  "\n".join(md), args.out)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
