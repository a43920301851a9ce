"""``coordinator`` — run and use a coordinator cluster from the shell.

    coordinator local --nodes 3                  # a local cluster in the foreground (Ctrl-C stops)
    coordinator put KEY VALUE                    # in another terminal: finds the local cluster
    coordinator put KEY - < file                 # the value from stdin (or --file PATH)
    coordinator get KEY [--stale]
    coordinator get PREFIX --prefix [--limit N] [--keys-only|--count-only] [-w json|table]
    coordinator get KEY --range-end END | --from-key   # [KEY, END) / every key from KEY on
    coordinator txn '{"compare": [...], "success": [...], "failure": [...]}'   # or - / --file
    coordinator get KEY --rev N                  # as of a past revision; coordinator compact N
    coordinator cas KEY EXPECTED NEW [--absent]  # --absent: expect the key to be missing
    coordinator delete KEY
    coordinator put KEY VALUE --lease ID         # the key is deleted when the lease ends
    coordinator lease grant TTL                  # seconds; prints the new lease's id (decimal)
    coordinator lease keepalive ID [--once]      # keeps it alive until Ctrl-C (exit 1 if lost)
    coordinator lease revoke ID | timetolive ID [--keys] | list
    coordinator watch KEY [RANGE_END] [--prefix] [--rev N] [--limit N] [--prev-kv] [-w json]
    coordinator status [--all]
    coordinator endpoint health|status [-w simple|json|table]   # every node; exit 1 if one is unhealthy
    coordinator token --out FILE                 # a fresh cluster token (mode 0600)
    coordinator serve --id 1 --listen 127.0.0.1:7001 \\
        --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 \\
        --data-dir /var/lib/coordinator/1 --token-file /etc/coordinator/token
        [--join]                                 # a member that lost its data directory
    coordinator sim ...                          # the deterministic simulator

Client commands find the cluster from ``--endpoints``/``--token-file`` (given before or after
the command), else the environment (``COORDINATOR_ENDPOINTS``, ``COORDINATOR_TOKEN_FILE``),
else the state file that a running ``coordinator local`` writes (``--state-file``,
``COORDINATOR_STATE_FILE`` or ``~/.cache/synctrain/...``). Values are at most 1 MiB.
Exit status: 0 success, 1 failure (unavailable/rejected; for ``status --all``: no healthy
majority), 2 usage error, 3 cas not swapped or key not found, 4 outcome unknown.

``coordinator local`` supervises its nodes: a node that dies is reported (its log is kept)
and started again after a short delay, growing while it keeps dying (``--no-restart``
keeps it down); the others keep serving meanwhile. The restart decision is a pure policy
(:class:`RestartPolicy`); only :class:`_Supervisor` starts processes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import math
import os
import pathlib
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO, EXIT_UNKNOWN = 0, 1, 2, 3, 4


def _parse_peers(text: str) -> dict[int, tuple[str, int]]:
    peers = {}
    for item in text.split(","):
        ident, sep, addr = item.strip().partition("=")
        host, sep2, port = addr.rpartition(":")
        if not sep or not sep2 or not ident.isdigit() or not port.isdigit():
            raise argparse.ArgumentTypeError(f"peer {item!r} is not ID=HOST:PORT")
        peers[int(ident)] = (host, int(port))
    return peers


def invocation() -> list[str]:
    """The command line that runs this CLI: the ``coordinator`` script installed beside the
    running interpreter (or on PATH), else ``python -m coordinator.cli`` (for scripts and tests
    that start it as a process)."""
    script = pathlib.Path(sys.executable).with_name("coordinator")
    if script.exists():
        return [str(script)]
    found = shutil.which("coordinator")
    return [found] if found else [sys.executable, "-m", "coordinator.cli"]


def _parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coordinator", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    _connection_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)

    local = sub.add_parser("local", help="run a local cluster in the foreground")
    local.add_argument("--nodes", type=int, default=3)
    local.add_argument("--data-dir", type=pathlib.Path,
                       help="keep the nodes' data here (default: a temporary dir, removed on "
                            "exit unless a node died)")
    local.add_argument("--state-file", type=pathlib.Path, default=argparse.SUPPRESS,
                       help="where to record endpoints + token file for other commands (one "
                            "running cluster per state file)")
    local.add_argument("--no-restart", action="store_true",
                       help="leave a node that dies down (default: start it again)")
    local.add_argument("--restart-delay", type=float, default=2.0, metavar="SECONDS",
                       help="wait before restarting a dead node (default 2; doubles while it "
                            "keeps dying)")

    token = sub.add_parser("token", help="print a fresh cluster token, or write it to --out")
    token.add_argument("--out", type=pathlib.Path,
                       help="create this file (mode 0600) holding the token; never overwrites")

    for name, extra in (("status", []), ("put", ["key", "value"]), ("get", ["key"]),
                        ("delete", ["key"]), ("cas", ["key", "expected", "new"]), ("txn", ["txn"]),
                        ("compact", ["revision"]), ("endpoint", ["what"])):
        p = sub.add_parser(name, help=f"{name} " + " ".join(x.upper() for x in extra))
        for arg in extra:
            if arg in ("value", "new", "txn"):  # "-": stdin; or --file PATH
                p.add_argument(arg, nargs="?", help="the transaction as JSON; - reads it from stdin"
                               if arg == "txn" else "the value; - reads it from stdin")
            elif arg == "revision":
                p.add_argument(arg, type=int, help="forget the history before this revision")
            elif arg == "what":
                p.add_argument(arg, choices=("health", "status"))
            else:
                p.add_argument(arg)
        _connection_flags(p, top=False)
        if name in ("put", "cas", "txn"):
            p.add_argument("--file", type=pathlib.Path,
                           help=f"read the {'value' if name == 'put' else 'NEW value' if name == 'cas' else 'transaction'}"
                                " from this file (at most 1 MiB)")
        if name == "get":
            p.add_argument("--stale", action="store_true",
                           help="read the answering node's local state (may lag)")
            p.add_argument("--prefix", action="store_true", help="every key that starts with KEY")
            p.add_argument("--range-end", default=None, help="the keys in [KEY, RANGE_END)")
            p.add_argument("--from-key", action="store_true", help="every key from KEY on")
            p.add_argument("--limit", type=int, default=0, help="at most this many keys (0: all)")
            p.add_argument("--keys-only", action="store_true", help="keys without their values")
            p.add_argument("--count-only", action="store_true", help="only how many keys match")
            p.add_argument("--rev", type=int, default=None, help="read as of this past revision")
        if name in ("get", "txn", "endpoint"):
            p.add_argument("-w", "--write-out", choices=("simple", "json", "table"), default="simple",
                           help="simple (default), json (etcdctl's field names, base64 keys and "
                                "values) or table")
        if name == "put":
            p.add_argument("--lease", type=_put_lease_arg, default=0, metavar="ID",
                           help="attach the key to this lease (`coordinator lease grant`): it is "
                                "deleted when the lease expires or is revoked")
        if name == "cas":
            p.add_argument("--absent", action="store_true",
                           help="expect the key to be absent (EXPECTED is ignored)")
        if name == "status":
            p.add_argument("--all", action="store_true",
                           help="every node, the unreachable ones marked; exit 1 without a "
                                "healthy majority")
    _add_lease(sub)
    _add_watch(sub)
    _add_member(sub)
    sub.add_parser("sim", help="the deterministic simulator (see coordinator sim --help)",
                   add_help=False)
    return parser


_LEASE_ID_HELP = "give the decimal id that `coordinator lease grant` or `coordinator lease list` printed"


def _lease_id_value(text: str, *, zero_ok: bool) -> int:
    from coordinator.leases import MAX_LEASE_ID

    if not re.fullmatch(r"[0-9]+", text):
        hint = (f" (lease ids are decimal here; etcdctl prints them in hex: `printf %d 0x{text}` "
                "converts one)" if re.fullmatch(r"(0[xX])?[0-9a-fA-F]+", text) else "")
        raise argparse.ArgumentTypeError(f"lease id {text!r} is not a decimal integer: "
                                         f"{_LEASE_ID_HELP}{hint}")
    value = int(text)
    if not (0 if zero_ok else 1) <= value <= MAX_LEASE_ID:
        raise argparse.ArgumentTypeError(
            f"lease id {text} is out of range: a lease id is 1..{MAX_LEASE_ID}"
            + (" (0: no lease)" if zero_ok else "") + f"; {_LEASE_ID_HELP}")
    return value


def _lease_id_arg(text: str) -> int:
    return _lease_id_value(text, zero_ok=False)


def _put_lease_arg(text: str) -> int:
    return _lease_id_value(text, zero_ok=True)


def _ttl_arg(text: str) -> float:
    try:
        ttl = float(text)
    except ValueError:
        ttl = math.nan
    if not math.isfinite(ttl) or ttl <= 0:
        raise argparse.ArgumentTypeError(
            f"TTL {text!r} is not a number of seconds > 0: give how long the lease lives "
            "without a keepalive, e.g. `coordinator lease grant 10`")
    return ttl


def _write_out_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("-w", "--write-out", choices=("simple", "json"), default="simple",
                   help=f"simple (default; etcdctl's lines) or json ({what})")


def _add_lease(sub: Any) -> None:
    lease = sub.add_parser("lease", help="lease grant|keepalive|revoke|timetolive|list (etcdctl's "
                                         "leases: keys that live while a client keeps them alive)")
    cmds = lease.add_subparsers(dest="lease_command", required=True, metavar="COMMAND")
    grant = cmds.add_parser("grant", help="a new lease of TTL seconds; prints its id")
    grant.add_argument("ttl", type=_ttl_arg, metavar="TTL",
                       help="seconds the lease lives without a keepalive (at least 0.5)")
    keep = cmds.add_parser("keepalive", help="keep a lease alive until Ctrl-C (or once)")
    keep.add_argument("id", type=_lease_id_arg, metavar="ID")
    keep.add_argument("--once", action="store_true",
                      help="renew the lease once and exit (default: keep renewing it, a "
                           "keepalive every third of its TTL, until Ctrl-C or SIGTERM)")
    revoke = cmds.add_parser("revoke", help="end a lease now, deleting its keys")
    revoke.add_argument("id", type=_lease_id_arg, metavar="ID")
    ttl = cmds.add_parser("timetolive", help="a lease's TTL, what is left of it[, its keys]")
    ttl.add_argument("id", type=_lease_id_arg, metavar="ID")
    ttl.add_argument("--keys", action="store_true", help="also list the keys attached to it")
    listing = cmds.add_parser("list", help="the ids of the live leases")
    for p, what in ((grant, '{"ID", "TTL"}'), (keep, '{"ID", "TTL"} per keepalive'),
                    (revoke, '{"ID", "deleted"}'), (ttl, '{"id", "ttl", "granted-ttl"[, "keys"]}'),
                    (listing, '{"leases": [{"id"}]}')):
        _connection_flags(p, top=False)
        _write_out_flag(p, what)


def _add_watch(sub: Any) -> None:
    watch = sub.add_parser("watch", help="print every change to KEY (or a range, a prefix) as it "
                                         "happens, until Ctrl-C or --limit events")
    watch.add_argument("key")
    watch.add_argument("range_end", nargs="?", default=None, metavar="RANGE_END",
                       help="watch the keys in [KEY, RANGE_END)")
    watch.add_argument("--prefix", action="store_true", help="every key that starts with KEY")
    watch.add_argument("--rev", type=int, default=None,
                       help="start at this revision (default: changes from now on); a past "
                            "revision replays the kept history from there")
    watch.add_argument("--limit", type=int, default=0,
                       help="exit 0 after this many events (default 0: run until Ctrl-C)")
    watch.add_argument("--prev-kv", action="store_true",
                       help="simple output: also print the key's value before each change")
    _connection_flags(watch, top=False)
    _write_out_flag(watch, 'one object per line and event: "type", "kv", "prev_kv", keys and '
                           "values in base64")


def _connection_flags(p: argparse.ArgumentParser, *, top: bool) -> None:
    """The flags that say which cluster to talk to, accepted before the subcommand (``top``:
    with the real defaults) and after it (SUPPRESS: when absent there, the value given
    before the subcommand stands)."""
    default: Any = None if top else argparse.SUPPRESS
    p.add_argument("--endpoints", default=default, help="HOST:PORT,HOST:PORT,...")
    p.add_argument("--token-file", type=pathlib.Path, default=default)
    p.add_argument("--timeout", type=float, default=10.0 if top else default,
                   help="seconds (default 10)")
    p.add_argument("--state-file", type=pathlib.Path, default=default,
                   help="the state file of the `coordinator local` to use (or to start)")


def _add_serve(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run one node of a cluster")
    serve.add_argument("--id", type=int, required=True, help="this node's id (1, 2, ...)")
    serve.add_argument("--listen", type=_parse_addr, help="HOST:PORT (default: its --peers entry)")
    serve.add_argument("--peers", type=_parse_peers, required=True,
                       help="every member, this one too: 1=HOST:PORT,2=HOST:PORT,...")
    serve.add_argument("--data-dir", type=pathlib.Path, required=True)
    serve.add_argument("--token-file", type=pathlib.Path, required=True,
                       help="file holding the cluster's shared secret (>= 32 characters; "
                            "`coordinator token --out FILE` makes one)")
    serve.add_argument("--tick-ms", type=float, default=15.0)
    serve.add_argument("--election-tick", type=int, default=10)
    serve.add_argument("--heartbeat-tick", type=int, default=1)
    serve.add_argument("--snapshot-every", type=int, default=10_000,
                       help="snapshot after this many applied entries (default 10000)")
    serve.add_argument("--snapshot-min-every", type=int, default=1_000,
                       help="from this many applied entries on, snapshot as soon as their data "
                            "outweighs the last snapshot: a small state restarts from a fresh "
                            "snapshot, not a long log (default 1000; 0: off)")
    serve.add_argument("--snapshot-bytes", type=int, default=64 << 20,
                       help="...or after this many bytes of applied entry data (default 64 MiB)")
    serve.add_argument("--keep-bytes-after-snapshot", type=int, default=16 << 20,
                       help="log tail kept after a snapshot, at most (default 16 MiB)")
    serve.add_argument("--max-retained-log-bytes", type=int, default=256 << 20,
                       help="writes are refused (overloaded, retryable) while the log held in "
                            "memory is over this (default 256 MiB)")
    serve.add_argument("--stall-dump-ms", type=float, default=2000.0,
                       help="write every thread's stack to the log when the event loop is "
                            "blocked this long (0: never; default 2000)")
    serve.add_argument("--join", action="store_true",
                       help="this member of an existing cluster lost its data directory: start "
                            "it empty and recovering (no votes until the leader repaired it). "
                            "Needed on an empty --data-dir for a node the cluster knows; "
                            "ignored when the directory holds state")
    serve.add_argument("--no-fsync", action="store_true", help="unsafe: skip fsync (tests only)")
    persist = serve.add_mutually_exclusive_group()
    persist.add_argument("--leader-parallel-persist", dest="persist_before_send",
                         action="store_false", default=False,
                         help="a steady leader sends its appends while its own fsync runs "
                              "(Raft thesis 10.2.1, as etcd does; the default)")
    persist.add_argument("--persist-before-send", dest="persist_before_send",
                         action="store_true",
                         help="the leader too sends nothing before its fsync returns "
                              "(one more fsync on every write's path)")
    serve.add_argument("--persist-inline", action="store_true",
                       help="fsync on the event loop instead of a worker thread (for comparison)")
    serve.add_argument("--commit-broadcast", action="store_true",
                       help="send each new commit index to the followers at once in empty "
                            "appends (etcd's way; off: it rides on the next append or heartbeat)")
    serve.add_argument("--ready-file", type=pathlib.Path, help=argparse.SUPPRESS)
    # for a supervisor (coordinator.cluster.NodeProcessHost): the token comes as the first line
    # of stdin (``--token-file -``) and the node stops when stdin closes, that is when its
    # supervisor dies; its CPU priority is set before it starts a thread
    serve.add_argument("--stop-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--nice", type=int, default=0, help=argparse.SUPPRESS)
    serve.add_argument("--sched-idle", action="store_true", help=argparse.SUPPRESS)
    # tests only: a small frame limit makes a small state span several snapshot chunks
    serve.add_argument("--max-frame-bytes", type=int, help=argparse.SUPPRESS)


@functools.lru_cache(maxsize=1)
def parser() -> argparse.ArgumentParser:
    """The CLI's parser, built once per process (~20 ms here): the node launcher builds it
    before it forks, so a forked node does not build it again (argparse parsers are reusable)."""
    return build_parser()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:
        from coordinator.testing import simulator

        return int(simulator.main(argv[1:]) or 0)
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return _serve(args)
    if args.command == "local":
        return _local(args)
    if args.command == "token":
        return _token(args)
    return _client_command(args)


def _serve(args: argparse.Namespace) -> int:
    from coordinator.server import ServerConfig, serve
    from coordinator.storage import DataDirLocked, StorageError
    from coordinator.transport import DEFAULT_MAX_FRAME_BYTES, check_token, load_token

    logging.getLogger("coordinator").setLevel(min(logging.INFO, logging.root.level))
    _lower_own_priority(args.nice, args.sched_idle)
    try:
        if str(args.token_file) == "-":
            token = check_token(sys.stdin.buffer.readline(4096).strip(), "the token on stdin")
        else:
            token = load_token(args.token_file)
        config = ServerConfig(
            node_id=args.id, peers=args.peers, data_dir=args.data_dir,
            token=token, listen=args.listen,
            tick_s=args.tick_ms / 1000.0, election_tick=args.election_tick,
            heartbeat_tick=args.heartbeat_tick, fsync=not args.no_fsync,
            snapshot_every=args.snapshot_every, snapshot_bytes=args.snapshot_bytes,
            snapshot_min_every=args.snapshot_min_every,
            keep_bytes_after_snapshot=args.keep_bytes_after_snapshot,
            max_retained_log_bytes=args.max_retained_log_bytes, join=args.join,
            stall_dump_s=args.stall_dump_ms / 1000.0 if args.stall_dump_ms > 0 else None,
            persist_in_thread=not args.persist_inline,
            leader_parallel_persist=not args.persist_before_send,
            commit_broadcast=args.commit_broadcast,
            max_frame_bytes=args.max_frame_bytes or DEFAULT_MAX_FRAME_BYTES)
        asyncio.run(serve(config, ready_file=args.ready_file,
                          stop_on_stdin_eof=args.stop_on_stdin_eof))
    except (ValueError, OSError) as exc:
        print(f"coordinator serve: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except DataDirLocked as exc:
        print(f"coordinator serve: {exc} (is another server using it?)", file=sys.stderr)
        return EXIT_FAIL
    except StorageError as exc:
        print(f"coordinator serve: cannot open the data dir: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except RuntimeError as exc:
        print(f"coordinator serve: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def _lower_own_priority(nice: int, sched_idle: bool) -> None:
    """``serve --nice N --sched-idle``: run below the default CPU priority (every thread the
    node starts later inherits it)."""
    from coordinator.cluster import idle_priority, lower_priority

    if nice:
        lower_priority(nice)
    if sched_idle and not idle_priority():
        logging.getLogger("coordinator").warning(
            "could not run at idle priority (SCHED_IDLE); running at the normal priority")


def _token(args: argparse.Namespace) -> int:
    from coordinator.cluster import write_token_file
    from coordinator.transport import generate_token

    if args.out is None:
        print(generate_token())
        return EXIT_OK
    try:
        write_token_file(args.out)
    except FileExistsError:
        print(f"coordinator token: {args.out} exists; not overwriting it (a running cluster may "
              "use it): remove it first or choose another path", file=sys.stderr)
        return EXIT_FAIL
    except OSError as exc:
        print(f"coordinator token: cannot create {args.out}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"wrote a fresh cluster token to {args.out} (mode 0600)")
    return EXIT_OK


# ---------------------------------------------------------------- coordinator local


@dataclasses.dataclass
class RestartPolicy:
    """When to start a dead node again. Pure: the caller passes the clock.

    The first restart comes ``delay_s`` after the death; a node that dies again within
    ``stable_s`` of its restart waits twice as long as last time, up to ``max_delay_s`` (a
    crash loop costs little); one that ran ``stable_s`` is back to ``delay_s``.
    ``restart=False`` keeps dead nodes down (None)."""

    restart: bool = True
    delay_s: float = 2.0
    max_delay_s: float = 60.0
    stable_s: float = 30.0
    _delay_s: dict[int, float] = dataclasses.field(default_factory=dict)
    _started_at: dict[int, float] = dataclasses.field(default_factory=dict)

    def restart_at(self, node_id: int, died_at: float) -> float | None:
        """When to start ``node_id``, which died at ``died_at`` (None: never)."""
        if not self.restart:
            return None
        last = self._delay_s.get(node_id)
        started = self._started_at.get(node_id)
        crash_loop = last is not None and started is not None and died_at - started < self.stable_s
        delay = min(self.max_delay_s, 2 * last) if crash_loop and last else self.delay_s
        self._delay_s[node_id] = delay
        return died_at + delay

    def started(self, node_id: int, at: float) -> None:
        self._started_at[node_id] = at


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class _Supervisor:
    """The controller of ``coordinator local``: reports every node that dies, starts it
    again when the policy says so, reports it back up, and keeps the state file's pids
    current. Called with the clock on every tick of the foreground loop."""

    def __init__(self, cluster: Any, policy: RestartPolicy, state_file: pathlib.Path) -> None:
        self.cluster, self.policy, self.state_file = cluster, policy, state_file
        self.due: dict[int, float] = {}  # node id -> when to start it again
        self.coming_up: set[int] = set()
        self.kept_down: set[int] = set()
        self.any_died = False

    def tick(self, now: float) -> None:
        for i in self.cluster.node_ids:
            if i in self.kept_down:
                continue
            if i in self.due:
                if now >= self.due[i]:
                    self._start(i, now)
            elif not self.cluster.is_running(i):
                self._died(i, now)
            elif i in self.coming_up and self.cluster.is_serving(i):
                self.coming_up.discard(i)
                self._say(f"node {i} is serving again (pid {self.cluster.pid(i)})")
                self._record()

    def _died(self, i: int, now: float) -> None:
        self.any_died = True
        self.coming_up.discard(i)
        n = len(self.cluster.node_ids)
        alive = sum(self.cluster.is_running(j) for j in self.cluster.node_ids)
        quorum = n // 2 + 1
        health = (f"the other nodes keep serving ({alive} of {n} running)" if alive >= quorum
                  else f"only {alive} of {n} run: writes wait until {quorum} do")
        self._say(f"node {i} exited ({_exit_reason(self.cluster.exit_code(i))}); its log is "
                  f"kept: {self.cluster.log_path(i)}; {health}")
        at = self.policy.restart_at(i, now)
        if at is None:
            self.kept_down.add(i)
            self._say(f"node {i} stays down (--no-restart)")
        else:
            self.due[i] = at
            self._say(f"restarting node {i} in {at - now:.1f} s (--no-restart keeps dead nodes "
                      "down)")

    def _start(self, i: int, now: float) -> None:
        del self.due[i]
        self.policy.started(i, now)
        try:
            self.cluster.start_node(i)
        except OSError as exc:
            self._say(f"cannot start node {i}: {exc}")
            self._died(i, now)
            return
        self.coming_up.add(i)
        self._say(f"node {i} restarted (pid {self.cluster.pid(i)}), recovering from its data")

    def _record(self) -> None:
        from coordinator.cluster import write_state_file

        write_state_file(self.cluster, self.state_file)

    @staticmethod
    def _say(text: str) -> None:
        print(f"coordinator: {text}", flush=True)


def _lock_state_file(path: pathlib.Path) -> TextIO | None:
    """Hold an exclusive lock beside ``path`` for this process's lifetime (the kernel drops
    it when the process dies, however it dies); None if another process holds it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def _refuse_second_local(state_file: pathlib.Path) -> int:
    from coordinator.cluster import read_state_file

    state = read_state_file(state_file) or {}
    what = (f" (coordinator local pid {state.get('owner_pid')}, endpoints "
            f"{','.join(map(str, state.get('endpoints', [])))})" if state else "")
    print(f"coordinator local: a cluster recorded in {state_file} is still running{what}. "
          "Stop it first (Ctrl-C in its terminal), or start a second cluster with a state "
          "file of its own: `coordinator local --state-file OTHER.json` (clients then pass "
          "`--state-file OTHER.json` or set COORDINATOR_STATE_FILE)", file=sys.stderr)
    return EXIT_FAIL


def _local(args: argparse.Namespace) -> int:
    from coordinator.cluster import LocalCluster, state_file_path, write_state_file

    state_file = args.state_file or state_file_path()
    lock = _lock_state_file(state_file)
    if lock is None:
        return _refuse_second_local(state_file)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = LocalCluster(nodes=args.nodes, data_dir=args.data_dir)
    try:
        try:
            cluster.start()
        except (OSError, ValueError, RuntimeError, TimeoutError) as exc:
            cluster.keep_data = True  # the nodes' logs say why
            print(f"coordinator local: cannot start the cluster: {exc}", file=sys.stderr)
            return EXIT_FAIL
        write_state_file(cluster, state_file)
        _print_banner(cluster, args.nodes, state_file)
        policy = RestartPolicy(restart=not args.no_restart, delay_s=max(0.1, args.restart_delay))
        supervisor = _Supervisor(cluster, policy, state_file)
        while not stop.wait(0.2):
            supervisor.tick(time.monotonic())
        cluster.keep_data = supervisor.any_died  # keep the logs of the nodes that died
    finally:
        state_file.unlink(missing_ok=True)
        print("coordinator: stopping the local cluster", flush=True)
        cluster.stop()
        if cluster.keep_data and cluster.data_dir.exists():
            print(f"coordinator: kept {cluster.data_dir} (the nodes' data and logs)", flush=True)
        lock.close()
    return EXIT_OK


def _print_banner(cluster: Any, nodes: int, state_file: pathlib.Path) -> None:
    leader = cluster.leader()
    print(f"coordinator: local cluster of {nodes} nodes is up (leader: node {leader})")
    print(f"  endpoints:  {','.join(cluster.endpoints)}")
    print(f"  token file: {cluster.token_file}")
    print(f"  data dir:   {cluster.data_dir}")
    print(f"  state file: {state_file}")
    print("In another terminal:  coordinator put hello world && coordinator get hello")
    print("A node that dies is restarted. Ctrl-C stops the cluster.", flush=True)


# ---------------------------------------------------------------- client commands


class _UsageError(Exception):
    """A command line that cannot be run as given (exit status 2)."""


def _resolve_cluster(args: argparse.Namespace) -> tuple[str, pathlib.Path]:
    from coordinator.cluster import read_state_file, state_file_owner_alive, state_file_path

    endpoints = args.endpoints or os.environ.get("COORDINATOR_ENDPOINTS")
    token_file = args.token_file or os.environ.get("COORDINATOR_TOKEN_FILE")
    if not endpoints or not token_file:
        path = args.state_file or state_file_path()
        state = read_state_file(path)
        if state is None:
            raise LookupError(
                "no cluster given: pass --endpoints and --token-file, set COORDINATOR_ENDPOINTS "
                "and COORDINATOR_TOKEN_FILE, or start one with `coordinator local --nodes 3` "
                f"(it records itself in {path})")
        if not state_file_owner_alive(state):
            raise LookupError(
                f"the cluster recorded in {path} is gone (its `coordinator local`, pid "
                f"{state.get('owner_pid')}, has exited): start one with `coordinator local`")
        endpoints = endpoints or ",".join(state["endpoints"])
        token_file = token_file or state["token_file"]
    return endpoints, pathlib.Path(token_file)


def _client_command(args: argparse.Namespace) -> int:
    from coordinator.client import Client, CoordinatorError, OutcomeUnknown

    name = " ".join(filter(None, (args.command, getattr(args, "lease_command", None))))
    try:
        endpoints, token_file = _resolve_cluster(args)
        with Client(endpoints, token_file=token_file, timeout_s=args.timeout) as client:
            return _run_client(client, args)
    except (LookupError, _UsageError) as exc:
        print(f"coordinator {name}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OutcomeUnknown as exc:
        print(f"coordinator {name}: outcome unknown: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    except (CoordinatorError, OSError, ValueError) as exc:
        print(f"coordinator {name}: {exc}", file=sys.stderr)
        return EXIT_FAIL


def _value_arg(args: argparse.Namespace, positional: str | None, what: str) -> bytes:
    """The value from the command line: the argument itself, ``-`` for stdin, or --file.
    Reads at most one byte over the limit, so a huge input is refused without being held."""
    from coordinator.client import RequestRejected
    from coordinator.statemachine import MAX_VALUE_BYTES

    if (positional is None) == (args.file is None):
        raise _UsageError(f"give {what} as an argument, - (read stdin) or --file PATH "
                          "(exactly one of them)")
    if args.file is not None:
        with open(args.file, "rb") as f:
            data, source = f.read(MAX_VALUE_BYTES + 1), str(args.file)
    elif positional == "-":
        data, source = sys.stdin.buffer.read(MAX_VALUE_BYTES + 1), "stdin"
    else:
        assert positional is not None
        return os.fsencode(positional)  # as typed, undecodable bytes included
    if len(data) > MAX_VALUE_BYTES:
        raise RequestRejected("bad_value", f"the value from {source} is over the limit of "
                                           f"{MAX_VALUE_BYTES} bytes (1 MiB)")
    return data


def _run_client(client: Any, args: argparse.Namespace) -> int:
    if args.command == "put":
        value = _value_arg(args, args.value, "VALUE")
        print(f"OK revision={client.put(args.key, value, lease=args.lease)}")
    elif args.command == "lease":
        return _lease(client, args)
    elif args.command == "watch":
        return _watch(client, args)
    elif args.command == "member":
        return _member(client, args)
    elif args.command == "get" and (args.prefix or args.range_end is not None or args.from_key
                                    or args.limit or args.keys_only or args.count_only
                                    or args.write_out != "simple" or args.rev is not None):
        return _range(client, args)
    elif args.command == "txn":
        return _txn(client, args)
    elif args.command == "endpoint":
        return _endpoint(client, args)
    elif args.command == "compact":
        print(f"compacted: the history starts at revision {client.compact(args.revision)}")
    elif args.command == "get":
        record = client.get_record(args.key, "stale" if args.stale else "linearizable")
        if record["value"] is None:
            print(f"(key {args.key!r} not found)", file=sys.stderr)
            return EXIT_NO
        sys.stdout.write(record["value"].decode("utf-8", errors="replace") + "\n")
    elif args.command == "delete":
        if not client.delete(args.key):
            print(f"(key {args.key!r} not found)", file=sys.stderr)
            return EXIT_NO
        print("deleted")
    elif args.command == "cas":
        expected = None if args.absent else args.expected
        if not client.cas(args.key, expected, _value_arg(args, args.new, "NEW")):
            print("not swapped: the current value differs from EXPECTED", file=sys.stderr)
            return EXIT_NO
        print("swapped")
    elif args.command == "status":
        return _status(client, args)
    return EXIT_OK


def _kv_json(kv: Any) -> dict:
    """A key as etcdctl's ``-w json`` writes it: key and value base64."""
    out = {"key": base64.b64encode(kv.key).decode(), "create_revision": kv.create_revision,
           "mod_revision": kv.mod_revision, "version": kv.version}
    if kv.value is not None:
        out["value"] = base64.b64encode(kv.value).decode()
    if kv.lease:
        out["lease"] = kv.lease
    return out


def _text(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", errors="replace")


def _print_range(result: Any, write_out: str, count_only: bool) -> None:
    if write_out == "json":
        print(json.dumps({"header": {"revision": result.revision}, "kvs": [_kv_json(kv) for kv in result.kvs],
                          "more": result.more, "count": result.count}))
    elif write_out == "table":
        rows = [("KEY", "VALUE", "CREATE", "MOD", "VERSION")] + [
            (_text(kv.key), _text(kv.value), str(kv.create_revision), str(kv.mod_revision), str(kv.version))
            for kv in result.kvs]
        widths = [min(40, max(len(r[i]) for r in rows)) for i in range(5)]
        for row in rows:
            print(" | ".join(cell[:40].ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        print(f"({result.count} key{'s' if result.count != 1 else ''}{', more' if result.more else ''}; "
              f"revision {result.revision})", file=sys.stderr)
    elif count_only:
        print(result.count)
    else:
        for kv in result.kvs:
            print(_text(kv.key))
            if kv.value is not None:
                print(_text(kv.value))


def _range(client: Any, args: argparse.Namespace) -> int:
    """``get`` with range flags: etcdctl's ``get --prefix / --from-key / RANGE_END``."""
    if sum((args.prefix, args.range_end is not None, args.from_key)) > 1:
        raise _UsageError("give at most one of --prefix, --range-end and --from-key")
    if args.limit < 0:
        raise _UsageError("--limit must be >= 0")
    end = args.range_end if args.range_end is not None else ("\0" if args.from_key else None)
    result = client.range(args.key, end, prefix=args.prefix, limit=args.limit, keys_only=args.keys_only,
                          revision=args.rev,
                          count_only=args.count_only, consistency="stale" if args.stale else "linearizable")
    _print_range(result, args.write_out, args.count_only)
    if result.count == 0 and args.write_out == "simple" and not args.count_only:
        print("(no key matches)", file=sys.stderr)
        return EXIT_NO
    return EXIT_OK


_TXN_HELP = ('a transaction is JSON: {"compare": [{"key", "target": "value|version|create|mod", "op": '
             '"==|!=|<|>", "value"}], "success": [ops], "failure": [ops]}, an op {"put": {"key", "value"}}, '
             '{"delete": {"key"[, "range_end" | "prefix": true]}} or {"get": {"key"[, "range_end" | "prefix": '
             'true, "limit", "keys_only", "count_only"]}}')


def _txn_ops(items: Any, where: str) -> list:
    from coordinator.client import Delete, Get, Put

    if not isinstance(items, list):
        raise _UsageError(f"{where} must be a list; {_TXN_HELP}")
    ops: list[Any] = []
    for item in items:
        if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in ("put", "delete", "get") \
                or not isinstance(next(iter(item.values())), dict):
            raise _UsageError(f"{where}: {item!r:.80} is not an op; {_TXN_HELP}")
        kind, body = next(iter(item.items()))
        try:
            if kind == "put":
                ops.append(Put(body["key"], body["value"]))
            elif kind == "delete":
                ops.append(Delete(body["key"], body.get("range_end"), bool(body.get("prefix", False))))
            else:
                ops.append(Get(body["key"], body.get("range_end"), bool(body.get("prefix", False)),
                               int(body.get("limit", 0)), bool(body.get("keys_only", False)),
                               bool(body.get("count_only", False))))
        except (KeyError, TypeError, ValueError) as exc:
            raise _UsageError(f"{where}: {item!r:.80}: {exc}; {_TXN_HELP}") from None
    return ops


def _txn(client: Any, args: argparse.Namespace) -> int:
    """``txn``: etcdctl's transaction, given as JSON (argument, - for stdin, or --file)."""
    from coordinator.client import Compare

    raw = _value_arg(args, args.txn, "the transaction (JSON)")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise _UsageError(f"the transaction is not JSON ({exc}); {_TXN_HELP}") from None
    if not isinstance(doc, dict) or not set(doc) <= {"compare", "success", "failure"}:
        raise _UsageError(_TXN_HELP)
    compare = []
    for c in doc.get("compare", []):
        if not isinstance(c, dict) or not {"key", "target", "op", "value"} <= set(c):
            raise _UsageError(f"compare: {c!r:.80}; {_TXN_HELP}")
        compare.append(Compare(c["key"], c["target"], c["op"], c["value"]))
    result = client.txn(compare, _txn_ops(doc.get("success", []), "success"),
                        _txn_ops(doc.get("failure", []), "failure"))
    if args.write_out == "json":
        responses = [{"kvs": [_kv_json(kv) for kv in r.kvs], "count": r.count, "more": r.more}
                     if not isinstance(r, dict) else r for r in result.responses]
        print(json.dumps({"header": {"revision": result.revision}, "succeeded": result.succeeded,
                          "responses": responses}))
        return EXIT_OK
    print("SUCCESS" if result.succeeded else "FAILURE")
    for r in result.responses:
        if isinstance(r, dict):
            print("OK" if r.get("op") == "put" else str(r.get("deleted", "")))
        else:
            _print_range(r, "simple", False)
    return EXIT_OK


class _Stopped(BaseException):
    """Ctrl-C or SIGTERM ended a command that runs in the foreground (watch, keepalive)."""


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn the first SIGINT or SIGTERM into :class:`_Stopped` (raised where the command
    waits, a blocking read included); a second one gets the previous handler's treatment."""
    if threading.current_thread() is not threading.main_thread():  # main() called from a thread
        yield
        return
    sigs = (signal.SIGINT, signal.SIGTERM)
    before = {sig: signal.getsignal(sig) for sig in sigs}

    def restore() -> None:
        for sig, handler in before.items():
            signal.signal(sig, handler)

    def stop(signum: int, frame: Any) -> None:
        restore()
        raise _Stopped(signum)

    for sig in sigs:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        restore()


def _number(seconds: float) -> int | float:
    """A JSON number of seconds: an int when it is whole (etcdctl's TTLs are ints)."""
    return int(seconds) if float(seconds).is_integer() else round(seconds, 3)


def _secs(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def _lease(client: Any, args: argparse.Namespace) -> int:
    """``lease grant|keepalive|revoke|timetolive|list``: etcdctl's lease commands (ids in
    decimal)."""
    json_out = args.write_out == "json"
    what = args.lease_command
    if what == "grant":
        from coordinator.leases import MAX_TTL_MS, MIN_TTL_MS

        if not MIN_TTL_MS <= round(args.ttl * 1000) <= MAX_TTL_MS:
            raise _UsageError(f"TTL {_secs(args.ttl)}s is out of range: a lease lives "
                              f"{_secs(MIN_TTL_MS / 1000)}..{MAX_TTL_MS // 1000} s without a keepalive "
                              "(`coordinator lease keepalive ID` renews it)")
        lease_id = client.grant(args.ttl)
        print(json.dumps({"ID": lease_id, "TTL": _number(args.ttl)}) if json_out
              else f"lease {lease_id} granted with TTL({_secs(args.ttl)}s)")
    elif what == "keepalive":
        return _lease_keepalive(client, args)
    elif what == "revoke":
        deleted = client.revoke(args.id)
        print(json.dumps({"ID": args.id, "deleted": deleted}) if json_out
              else f"lease {args.id} revoked ({deleted} key{'' if deleted == 1 else 's'} deleted)")
    elif what == "timetolive":
        info = client.time_to_live(args.id, keys=args.keys)
        keys = info.get("keys", [])
        if json_out:
            out: dict[str, Any] = {"id": info["id"], "ttl": _number(info["remaining"]),
                                   "granted-ttl": _number(info["ttl"]), "keys_count": info["keys_count"]}
            if args.keys:
                out["keys"] = [base64.b64encode(k).decode() for k in keys]
            print(json.dumps(out))
        else:
            line = (f"lease {info['id']} granted with TTL({_secs(info['ttl'])}s), "
                    f"remaining({_secs(info['remaining'])}s)")
            if args.keys:
                line += f", attached keys([{' '.join(_text(k) for k in keys)}])"
                if len(keys) < info["keys_count"]:
                    line += f" (the first {len(keys)} of {info['keys_count']})"
            print(line)
    elif what == "list":
        ids = client.leases()
        if json_out:
            print(json.dumps({"leases": [{"id": i} for i in ids]}))
        else:
            print(f"found {len(ids)} lease{'' if len(ids) == 1 else 's'}")
            for lease_id in ids:
                print(lease_id)
    return EXIT_OK


def _print_keepalive(lease_id: int, ttl: float, write_out: str) -> None:
    print(json.dumps({"ID": lease_id, "TTL": _number(ttl)}) if write_out == "json"
          else f"lease {lease_id} keepalived with TTL({_secs(ttl)})", flush=True)


def _lease_keepalive(client: Any, args: argparse.Namespace) -> int:
    """``lease keepalive ID``: renew the lease every third of its TTL (retried through
    elections, by :class:`coordinator.client.LeaseKeeper`) and print each renewal, until
    Ctrl-C or SIGTERM (exit 0; the lease then expires after its TTL) or until the cluster
    says the lease is gone (exit 1). ``--once``: one renewal."""
    lease_id = args.id
    if args.once:
        _print_keepalive(lease_id, client.keepalive(lease_id), args.write_out)
        return EXIT_OK
    ttl = client.time_to_live(lease_id)["ttl"]  # lease_not_found: exit 1 before anything runs
    try:
        with _stop_on_signals():
            keeper = client.lease_keeper(lease_id, ttl)
            try:
                shown = failures = 0
                failing = False
                while not keeper.lost.is_set():
                    if keeper.keepalives > shown:
                        shown, failing = keeper.keepalives, False
                        _print_keepalive(lease_id, ttl, args.write_out)
                    elif keeper.failures > failures and not failing:
                        failing = True
                        print(f"coordinator lease keepalive: a keepalive of lease {lease_id} failed "
                              "(no leader answered in time); retrying: the lease expires if none "
                              f"succeeds within its TTL ({_secs(ttl)}s)", file=sys.stderr, flush=True)
                    failures = keeper.failures
                    time.sleep(0.05)
            finally:
                keeper.stop()
    except _Stopped:
        print(f"coordinator lease keepalive: stopped; lease {lease_id} expires in {_secs(ttl)}s "
              "unless kept alive again", file=sys.stderr)
        return EXIT_OK
    print(f"coordinator lease keepalive: lease {lease_id} is gone (it expired or was revoked, and "
          "its keys were deleted): grant a new one with `coordinator lease grant TTL` and put "
          "its keys again", file=sys.stderr)
    return EXIT_FAIL


def _print_event(event: Any, args: argparse.Namespace) -> None:
    kind = event.type.upper()  # PUT / DELETE, as etcdctl prints them
    kv = event.kv if event.type == "put" else dataclasses.replace(event.kv, value=None)
    if args.write_out == "json":
        print(json.dumps({"type": kind, "kv": _kv_json(kv),
                          "prev_kv": None if event.prev_kv is None else _kv_json(event.prev_kv)}),
              flush=True)
        return
    lines = [kind]
    if args.prev_kv and event.prev_kv is not None:
        lines += [_text(event.prev_kv.key), _text(event.prev_kv.value)]
    lines.append(_text(kv.key))
    if kv.value is not None:
        lines.append(_text(kv.value))
    print("\n".join(lines), flush=True)


def _watch(client: Any, args: argparse.Namespace) -> int:
    """``watch KEY [RANGE_END] [--prefix] [--rev N]``: print each change as it commits, in
    revision order, until Ctrl-C / SIGTERM (exit 0) or ``--limit`` events (exit 0); exit 1
    if the cluster cancels the watch (it fell behind the kept history)."""
    from coordinator.client import WatchCancelled

    if args.prefix and args.range_end is not None:
        raise _UsageError("give --prefix or RANGE_END, not both")
    if args.limit < 0:
        raise _UsageError(f"--limit must be >= 0 (0: no limit), got {args.limit}")
    if args.rev is not None and args.rev < 1:
        raise _UsageError(f"--rev must be a revision >= 1 (leave it out to watch from now), "
                          f"got {args.rev}")
    watch = client.watch(args.key, args.range_end, prefix=args.prefix, start_revision=args.rev)
    seen = 0
    try:
        with _stop_on_signals():
            for event in watch:
                _print_event(event, args)
                seen += 1
                if args.limit and seen >= args.limit:
                    break
    except _Stopped:
        pass
    except WatchCancelled as exc:
        print(f"coordinator watch: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except BrokenPipeError:  # the reader went away (`coordinator watch ... | head -3`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        watch.cancel()
    return EXIT_OK


_ENDPOINT_COLUMNS = {"status": ("endpoint", "id", "role", "leader", "term", "commit", "applied", "revision",
                                "keys", "took_ms"),
                     "health": ("endpoint", "health", "took_ms", "error")}


def _endpoint(client: Any, args: argparse.Namespace) -> int:
    """``endpoint health|status``: one row per node; exit 1 when a node is unhealthy (status:
    does not answer)."""
    rows = client.endpoint_health() if args.what == "health" else client.endpoint_status()
    bad = [r for r in rows if not r.get("health", "error" not in r)]
    if args.write_out == "json":
        print(json.dumps(rows))
    elif args.write_out == "table":
        _print_table(_ENDPOINT_COLUMNS[args.what], rows)
    else:
        for r in rows:
            if args.what == "health":
                print(f"{r['endpoint']} is {'healthy' if r['health'] else 'unhealthy'}: took {r['took_ms']} ms"
                      + (f" ({r['error']})" if r.get("error") else ""))
            elif "error" in r:
                print(f"{r['endpoint']}: down ({r['error']})")
            else:
                print(f"{r['endpoint']}, id {r['id']}, {r['role']}, term {r['term']}, leader {r['leader']}, "
                      f"commit {r['commit']}, applied {r['applied']}, revision {r['revision']}, "
                      f"{r['keys']} keys, took {r['took_ms']} ms")
    return EXIT_FAIL if bad else EXIT_OK


def _print_table(cols: Any, rows: list[dict]) -> None:
    """``rows`` as an aligned table of the columns ``cols`` (headers upper-cased)."""
    table = [[c.upper() for c in cols]] + [[str(r.get(c, "")) if r.get(c) is not None else ""
                                             for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _add_member(sub: Any) -> None:
    member = sub.add_parser("member", help="member list | add ID HOST:PORT [--learner] | remove ID | "
                                           "promote ID (etcdctl's member commands)")
    actions = member.add_subparsers(dest="action", required=True)
    for name, helptext in (("list", "every member, its address and whether it is a learner"),
                           ("add", "add a node (then start it with `coordinator serve --join`)"),
                           ("remove", "remove a node (it stops itself; the leader hands over first)"),
                           ("promote", "make a learner a voter once it has caught up")):
        p = actions.add_parser(name, help=helptext)
        if name != "list":
            p.add_argument("id", type=int, help="the node id (an integer > 0)")
        if name == "add":
            p.add_argument("address", help="HOST:PORT the new node will listen on")
            p.add_argument("--learner", action="store_true",
                           help="add it as a learner (no vote until `member promote`)")
        p.add_argument("-w", "--write-out", choices=("simple", "json", "table"), default="simple",
                       help="simple (default), json or table")
        _connection_flags(p, top=False)


_MEMBER_COLUMNS = ("ID", "name", "peerURLs", "isLearner", "isLeader")


def _member(client: Any, args: argparse.Namespace) -> int:
    """``member list|add|remove|promote``: the change, then the member list it left."""
    if args.action == "list":
        rows = client.member_list()
    elif args.action == "add":
        rows = client.member_add(args.id, args.address, learner=args.learner)
        print(f"member {args.id} added as a {'learner' if args.learner else 'voter'}: start it with "
              f"`coordinator serve --id {args.id} --listen {args.address} --join --peers ...` "
              "(--peers naming the current members and it)", file=sys.stderr)
    elif args.action == "remove":
        rows = client.member_remove(args.id)
        print(f"member {args.id} removed", file=sys.stderr)
    else:
        rows = client.member_promote(args.id)
        print(f"member {args.id} promoted to a voter", file=sys.stderr)
    if args.write_out == "json":
        print(json.dumps({"members": rows}))
    elif args.write_out == "table":
        _print_table(_MEMBER_COLUMNS, [dict(r, peerURLs=",".join(r["peerURLs"])) for r in rows])
    else:
        for r in rows:
            print(f"{r['ID']}, {r['name']}, {','.join(r['peerURLs'])}, "
                  f"{'learner' if r['isLearner'] else 'voter'}{', leader' if r['isLeader'] else ''}")
    return EXIT_OK


_STATUS_KEYS = ("id", "role", "term", "leader", "commit", "applied", "log_size",
                "snapshot_index", "peers", "endpoint")


def _status(client: Any, args: argparse.Namespace) -> int:
    """One node's status; with --all every node's, an unreachable one marked ``down``. Exit
    0 while a majority answers, 1 otherwise."""
    from coordinator.client import AuthenticationFailed, Client, CoordinatorError

    if not args.all:
        st = client.status()
        print(json.dumps({k: st.get(k) for k in _STATUS_KEYS}, default=str))
        return EXIT_OK
    answered = 0
    for host, port in list(client.endpoints):
        endpoint = f"{host}:{port}"
        try:
            with Client([endpoint], token=client.token, timeout_s=min(args.timeout, 2.0)) as one:
                st = one.status(endpoint)
        except AuthenticationFailed:
            raise
        except CoordinatorError as exc:
            print(json.dumps({"endpoint": endpoint, "role": "down", "error": str(exc)[:300]}))
            continue
        answered += 1
        print(json.dumps({k: st.get(k) for k in _STATUS_KEYS}, default=str))
    n, quorum = len(client.endpoints), len(client.endpoints) // 2 + 1
    verdict = ("a majority is healthy" if answered >= quorum
               else f"no majority (needs {quorum}): writes and linearizable reads wait")
    print(f"{answered} of {n} nodes answer: {verdict}", file=sys.stderr)
    return EXIT_OK if answered >= quorum else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
