"""``coordinator`` — run and use a coordinator cluster from the shell.

    coordinator local --nodes 3                  # a local cluster in the foreground (Ctrl-C stops)
    coordinator put KEY VALUE                    # in another terminal: finds the local cluster
    coordinator get KEY [--stale]
    coordinator cas KEY EXPECTED NEW [--absent]  # --absent: expect the key to be missing
    coordinator delete KEY
    coordinator status [--all]
    coordinator serve --id 1 --listen 127.0.0.1:7001 \\
        --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 \\
        --data-dir /var/lib/coordinator/1 --token-file /etc/coordinator/token
    coordinator sim ...                          # the deterministic simulator

Client commands find the cluster from ``--endpoints``/``--token-file``, else the environment
(``COORDINATOR_ENDPOINTS``, ``COORDINATOR_TOKEN_FILE``), else the state file that a running
``coordinator local`` writes (``COORDINATOR_STATE_FILE`` or ``~/.cache/synctrain/...``).
Exit status: 0 success, 1 failure (unavailable/rejected), 2 usage error, 3 cas not swapped or
key not found, 4 outcome unknown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pathlib
import signal
import sys
import threading
from typing import Any

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


def _parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coordinator", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one node of a cluster")
    serve.add_argument("--id", type=int, required=True, help="this node's id (1, 2, ...)")
    serve.add_argument("--listen", type=_parse_addr, help="HOST:PORT (default: its --peers entry)")
    serve.add_argument("--peers", type=_parse_peers, required=True,
                       help="every member, this one too: 1=HOST:PORT,2=HOST:PORT,...")
    serve.add_argument("--data-dir", type=pathlib.Path, required=True)
    serve.add_argument("--token-file", type=pathlib.Path, required=True,
                       help="file holding the cluster's shared secret (>= 16 bytes)")
    serve.add_argument("--tick-ms", type=float, default=15.0)
    serve.add_argument("--election-tick", type=int, default=10)
    serve.add_argument("--heartbeat-tick", type=int, default=1)
    serve.add_argument("--snapshot-every", type=int, default=10_000)
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
    # tests only: a small frame limit makes a small state span several snapshot chunks
    serve.add_argument("--max-frame-bytes", type=int, help=argparse.SUPPRESS)

    local = sub.add_parser("local", help="run a local cluster in the foreground")
    local.add_argument("--nodes", type=int, default=3)
    local.add_argument("--data-dir", type=pathlib.Path,
                       help="keep the nodes' data here (default: a temporary dir, removed)")
    local.add_argument("--state-file", type=pathlib.Path,
                       help="where to record endpoints + token file for other commands")

    for name, extra in (("status", []), ("put", ["key", "value"]), ("get", ["key"]),
                        ("delete", ["key"]), ("cas", ["key", "expected", "new"])):
        p = sub.add_parser(name, help=f"{name} " + " ".join(x.upper() for x in extra))
        for arg in extra:
            p.add_argument(arg)
        p.add_argument("--endpoints", help="HOST:PORT,HOST:PORT,...")
        p.add_argument("--token-file", type=pathlib.Path)
        p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
        if name == "get":
            p.add_argument("--stale", action="store_true",
                           help="read the answering node's local state (may lag)")
        if name == "cas":
            p.add_argument("--absent", action="store_true",
                           help="expect the key to be absent (EXPECTED is ignored)")
        if name == "status":
            p.add_argument("--all", action="store_true", help="every node, not just one")
    sub.add_parser("sim", help="the deterministic simulator (see coordinator sim --help)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:
        from coordinator.testing import simulator

        return int(simulator.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return _serve(args)
    if args.command == "local":
        return _local(args)
    return _client_command(args)


def _serve(args: argparse.Namespace) -> int:
    from coordinator.server import ServerConfig, serve
    from coordinator.storage import DataDirLocked, StorageError
    from coordinator.transport import DEFAULT_MAX_FRAME_BYTES, load_token

    logging.getLogger("coordinator").setLevel(min(logging.INFO, logging.root.level))
    try:
        config = ServerConfig(
            node_id=args.id, peers=args.peers, data_dir=args.data_dir,
            token=load_token(args.token_file), listen=args.listen,
            tick_s=args.tick_ms / 1000.0, election_tick=args.election_tick,
            heartbeat_tick=args.heartbeat_tick, fsync=not args.no_fsync,
            snapshot_every=args.snapshot_every, persist_in_thread=not args.persist_inline,
            leader_parallel_persist=not args.persist_before_send,
            commit_broadcast=args.commit_broadcast,
            max_frame_bytes=args.max_frame_bytes or DEFAULT_MAX_FRAME_BYTES)
        asyncio.run(serve(config, ready_file=args.ready_file))
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


def _local(args: argparse.Namespace) -> int:
    from coordinator.cluster import LocalCluster, state_file_path, write_state_file

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    state_file = args.state_file or state_file_path()
    with LocalCluster(nodes=args.nodes, data_dir=args.data_dir) as cluster:
        write_state_file(cluster, state_file)
        leader = cluster.leader()
        print(f"coordinator: local cluster of {args.nodes} nodes is up (leader: node {leader})")
        print(f"  endpoints:  {','.join(cluster.endpoints)}")
        print(f"  token file: {cluster.token_file}")
        print(f"  data dir:   {cluster.data_dir}")
        print(f"  state file: {state_file}")
        print("In another terminal:  coordinator put hello world && coordinator get hello")
        print("Ctrl-C stops the cluster.", flush=True)
        try:
            while not stop.wait(0.5):
                for i in cluster.node_ids:
                    if not cluster.is_running(i):
                        print(f"coordinator: node {i} exited; see {cluster.log_path(i)}",
                              file=sys.stderr, flush=True)
                        return EXIT_FAIL
        finally:
            state_file.unlink(missing_ok=True)
            print("coordinator: stopping the local cluster", flush=True)
    return EXIT_OK


def _resolve_cluster(args: argparse.Namespace) -> tuple[str, pathlib.Path]:
    from coordinator.cluster import state_file_path

    endpoints = args.endpoints or os.environ.get("COORDINATOR_ENDPOINTS")
    token_file = args.token_file or os.environ.get("COORDINATOR_TOKEN_FILE")
    if not endpoints or not token_file:
        path = state_file_path()
        if not path.exists():
            raise LookupError(
                "no cluster given: pass --endpoints and --token-file, set COORDINATOR_ENDPOINTS "
                "and COORDINATOR_TOKEN_FILE, or start one with `coordinator local --nodes 3` "
                f"(it records itself in {path})")
        state = json.loads(path.read_text())
        endpoints = endpoints or ",".join(state["endpoints"])
        token_file = token_file or state["token_file"]
    return endpoints, pathlib.Path(token_file)


def _client_command(args: argparse.Namespace) -> int:
    from coordinator.client import Client, CoordinatorError, OutcomeUnknown

    try:
        endpoints, token_file = _resolve_cluster(args)
        with Client(endpoints, token_file=token_file, timeout_s=args.timeout) as client:
            return _run_client(client, args)
    except LookupError as exc:
        print(f"coordinator {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OutcomeUnknown as exc:
        print(f"coordinator {args.command}: outcome unknown: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    except (CoordinatorError, OSError, ValueError) as exc:
        print(f"coordinator {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAIL


def _run_client(client: Any, args: argparse.Namespace) -> int:
    if args.command == "put":
        print(f"OK revision={client.put(args.key, args.value)}")
    elif args.command == "get":
        record = client.get_record(args.key, "stale" if args.stale else "linearizable")
        if record["value"] is None:
            print(f"(key {args.key!r} not found)", file=sys.stderr)
            return EXIT_NO
        sys.stdout.write(record["value"].decode("utf-8", errors="replace") + "\n")
    elif args.command == "delete":
        print("deleted" if client.delete(args.key) else "not found")
    elif args.command == "cas":
        expected = None if args.absent else args.expected
        if not client.cas(args.key, expected, args.new):
            print("not swapped: the current value differs from EXPECTED", file=sys.stderr)
            return EXIT_NO
        print("swapped")
    elif args.command == "status":
        nodes = client.endpoints if args.all else [None]
        for endpoint in nodes:
            st = client.status(endpoint)
            keep = ("id", "role", "term", "leader", "commit", "applied", "log_size",
                    "snapshot_index", "peers", "endpoint")
            print(json.dumps({k: st.get(k) for k in keep}, default=str))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
