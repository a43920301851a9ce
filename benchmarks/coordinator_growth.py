"""Coordinator growth benchmark: the coordinator and etcd, same run, as the state grows.

Each system runs as one 3-node cluster on loopback with fsync on, and is loaded step by step
with *distinct* keys (64-byte values, ``--threads`` client threads spread over a few load
processes) up to each step's total, e.g. 10k, 100k, 300k keys (issue 17). After each step's
load it measures, per system:

- puts/s, put latency p50 / p99 / max during the load;
- elections during the load (the leader's term before and after; nothing was killed);
- RSS and data-directory size of every node;
- follower restart -> caught up: SIGKILL a follower, start it again, time until it has
  applied everything the leader has (no writes meanwhile);
- whole-cluster restart -> first put: SIGKILL all three, start all three, time until a put
  is acknowledged.

Targets (issue 17): 0 elections nobody triggered; max put latency <= 10x p99 and <= 500 ms at
300k keys; restart -> serving within etcd's time in the same run. etcd is installed by
``coordinator_bench.setup`` (``apt-get install etcd-server``) when missing.

    python benchmarks/coordinator_growth.py [--steps 10000,100000,300000] [--threads 16]
        [--systems coordinator,etcd]

Results: ``benchmarks/results/coordinator_growth.{json,md}``. On a shared 2-core machine keep
runs short (e.g. ``--steps 10000,30000``) and read the load average recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from coordinator_bench import (  # noqa: E402 - the sibling's systems and clients
    RESULTS_DIR,
    VALUE,
    CoordinatorSystem,
    EtcdSystem,
    System,
    _etcd_call,
    make_conn,
    percentile,
    setup,
    wait_until,
)

LOAD_PROCESSES = 4


# ----------------------------------------------------------------------------- load
def _load_range(spec: dict, lo: int, hi: int, threads: int, out: Any) -> None:
    """Put keys ``lo..hi-1`` (distinct) from ``threads`` threads; report latencies."""
    samples: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads

    def worker(t: int) -> None:
        conn = make_conn(spec, timeout_s=30.0)
        for k in range(lo + t, hi, threads):
            t0 = time.perf_counter()
            try:
                conn.put(f"key-{k:09d}", VALUE)
                samples[t].append(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - counted; the load goes on
                errors[t] += 1
        conn.close()

    ts = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put(([s for per in samples for s in per], sum(errors)))


def load(spec: dict, lo: int, hi: int, threads: int) -> dict:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs_n = min(LOAD_PROCESSES, threads)
    per = [threads // procs_n + (1 if k < threads % procs_n else 0) for k in range(procs_n)]
    bounds = [lo + (hi - lo) * k // procs_n for k in range(procs_n + 1)]
    t0 = time.monotonic()
    procs = [ctx.Process(target=_load_range, args=(spec, bounds[k], bounds[k + 1], per[k], out))
             for k in range(procs_n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=3600) for _ in procs]
    elapsed = time.monotonic() - t0
    for p in procs:
        p.join(30)
    lat = [s for r in results for s in r[0]]
    return {"keys": hi - lo, "seconds": round(elapsed, 2),
            "puts_per_s": round(len(lat) / elapsed, 1), "errors": sum(r[1] for r in results),
            "p50_ms": round(percentile(lat, 50) * 1e3, 2),
            "p99_ms": round(percentile(lat, 99) * 1e3, 2),
            "max_ms": round(max(lat) * 1e3, 1) if lat else None}


# ----------------------------------------------------------------------------- probes
def _rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _du_mb(path: pathlib.Path) -> float:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return round(total / (1 << 20), 1)


class GrowthCoordinator(CoordinatorSystem):
    def term(self) -> int:
        return max((self.cluster.status(i) or {}).get("term", 0) for i in (1, 2, 3))

    def pids(self) -> dict[int, int]:
        return {i: self.cluster.pid(i) for i in (1, 2, 3)}

    def data_dir(self, i: int) -> pathlib.Path:
        return self.cluster.node_dir(i)

    def start_node(self, i: int) -> None:
        self.cluster.start_node(i)

    def caught_up(self, follower: int, leader: int) -> bool:
        st, lead = self.cluster.status(follower, 0.5), self.cluster.status(leader, 0.5)
        return bool(st and lead and st["applied"] >= lead["commit"])

    def extra(self) -> dict:
        return {i: (self.cluster.status(i) or {}).get("restore", {}) for i in (1, 2, 3)}


class GrowthCoordinatorEtcdTiming(GrowthCoordinator):
    """The coordinator with etcd's timing: heartbeat ~105 ms, election timeout ~1 s (its
    default is 15 ms / 150-300 ms), to tell elections caused by the timeout from others."""

    name = "coordinator-1s"
    extra_args = ["--heartbeat-tick", "7", "--election-tick", "67"]


class GrowthEtcd(EtcdSystem):
    def _st(self, i: int) -> dict:
        return self._status(i)

    def term(self) -> int:
        terms = []
        for i in (1, 2, 3):
            try:
                st = self._st(i)
            except Exception:  # noqa: BLE001 - a node that does not answer has no say
                continue
            terms.append(int(st.get("raftTerm", st.get("raft_term", 0))))
        return max(terms, default=0)

    def pids(self) -> dict[int, int]:
        return {i: p.pid for i, p in self.procs.items()}

    def data_dir(self, i: int) -> pathlib.Path:
        return self.dir / f"n{i}"

    def start_node(self, i: int) -> None:
        self._spawn(i, "existing")

    def caught_up(self, follower: int, leader: int) -> bool:
        st, lead = self._st(follower), self._st(leader)
        return int(st.get("raftAppliedIndex", 0)) >= int(lead.get("raftIndex", 1 << 62))

    def extra(self) -> dict:
        return {}


def follower_restart_s(system: Any) -> float:
    leader = system.leader()
    follower = next(i for i in (1, 2, 3) if i != leader)
    system.kill(follower)
    t0 = time.monotonic()
    system.start_node(follower)
    wait_until(lambda: system.caught_up(follower, leader), 600, "the follower to catch up")
    return round(time.monotonic() - t0, 2)


def cluster_restart_s(system: Any) -> float:
    for i in (1, 2, 3):
        system.kill(i)
    t0 = time.monotonic()
    for i in (1, 2, 3):
        system.start_node(i)
    conn = make_conn(system.client_spec(None), timeout_s=600.0, attempt_timeout_s=1.0)
    try:
        conn.put("after-restart", VALUE)
    finally:
        conn.close()
    return round(time.monotonic() - t0, 2)


# ----------------------------------------------------------------------------- runs
def run_system(system: Any, steps: list[int], threads: int) -> list[dict]:
    print(f"[{system.name}] starting a 3-node cluster", flush=True)
    system.start()
    rows: list[dict] = []
    try:
        loaded = 0
        for target in steps:
            leader = system.leader()
            term0, load_avg = system.term(), os.getloadavg()[0]
            r = load(system.client_spec(leader), loaded, target, threads)
            loaded = target
            r["total_keys"] = target
            r["elections"] = system.term() - term0
            r["rss_mb"] = {i: _rss_mb(p) for i, p in system.pids().items()}
            r["disk_mb"] = {i: _du_mb(system.data_dir(i)) for i in (1, 2, 3)}
            r["follower_restart_to_caught_up_s"] = follower_restart_s(system)
            r["cluster_restart_to_first_put_s"] = cluster_restart_s(system)
            r["restore"] = system.extra()
            r["load_avg_1min"] = [round(load_avg, 2), round(os.getloadavg()[0], 2)]
            print(f"  {target} keys: {json.dumps(r)}", flush=True)
            rows.append(r)
        return rows
    finally:
        system.stop()


def markdown(results: dict) -> str:
    lines = ["# Coordinator growth benchmark", "",
             f"{results['machine']}; 3 nodes on loopback, fsync on; 64-byte values, distinct "
             f"keys, {results['config']['threads']} client threads; generated by "
             f"`python benchmarks/coordinator_growth.py --steps "
             f"{','.join(map(str, results['config']['steps']))}`.", "",
             "| system | keys | puts/s | p50 ms | p99 ms | max ms | elections | RSS MB "
             "(per node) | disk MB | follower restart s | cluster restart s | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results["systems"].items():
        if isinstance(rows, dict):
            lines.append(f"| {name} | error: {rows.get('error')} |")
            continue
        for r in rows:
            lines.append(
                f"| {name} | {r['total_keys']} | {r['puts_per_s']} | {r['p50_ms']} | "
                f"{r['p99_ms']} | {r['max_ms']} | {r['elections']} | "
                f"{'/'.join(str(v) for v in r['rss_mb'].values())} | "
                f"{'/'.join(str(v) for v in r['disk_mb'].values())} | "
                f"{r['follower_restart_to_caught_up_s']} | {r['cluster_restart_to_first_put_s']} "
                f"| {'/'.join(map(str, r['load_avg_1min']))} |")
    lines += ["", "Targets: 0 elections nobody triggered; max put latency <= 10x p99 and "
              "<= 500 ms at 300k keys; restart -> serving within etcd's time. A cluster restart "
              "kills all three nodes (SIGKILL) and starts them together; the time includes "
              "process start, recovery (snapshot + WAL) and an election.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", default="coordinator,coordinator-1s,etcd")
    parser.add_argument("--steps", default="10000,100000,300000")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    setup(systems)
    makers: dict[str, type[System]] = {"coordinator": GrowthCoordinator,
                                       "coordinator-1s": GrowthCoordinatorEtcdTiming,
                                       "etcd": GrowthEtcd}
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}, etcd "
                   f"{_etcd_version() if 'etcd' in systems else 'n/a'}",
        "config": {"steps": steps, "threads": args.threads, "load_processes": LOAD_PROCESSES},
        "systems": {}}
    for name in systems:
        try:
            results["systems"][name] = run_system(makers[name](), steps, args.threads)
        except Exception as exc:  # noqa: BLE001 - one failing still reports the other
            print(f"[{name}] failed: {exc!r}", flush=True)
            results["systems"][name] = {"error": repr(exc)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coordinator_growth.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "coordinator_growth.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def _etcd_version() -> str:
    try:
        out = subprocess.run(["etcd", "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.split("\n")[0].split()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


__all__ = ["main", "load", "run_system", "_etcd_call"]

if __name__ == "__main__":
    sys.exit(main())
