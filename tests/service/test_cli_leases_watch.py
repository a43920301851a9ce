"""The CLI's lease and watch commands (etcdctl's ``lease grant|keepalive|revoke|timetolive|list``,
``put --lease`` and ``watch``), run as real processes against a real cluster: a key put with a
lease is listed by ``timetolive --keys`` and deleted by ``revoke`` or by the lease's expiry; a
``lease keepalive`` in the background keeps a 1 s lease alive until it is terminated; a ``watch``
prints the changes made after it in revision order; bad ids and TTLs are refused with a message
that says what to give instead."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import secrets
import signal
import subprocess
import time

import pytest

from coordinator.cli import invocation

CLI_TIMEOUT_S = 60


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(invocation() + list(args), env=env, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)


def _ok(env: dict, *args: str) -> str:
    result = _cli(env, *args)
    assert result.returncode == 0, f"coordinator {' '.join(args)}: {result.stderr}"
    return result.stdout


def _env(cluster, tmp_path: pathlib.Path) -> dict:
    return dict(os.environ, COORDINATOR_ENDPOINTS=",".join(cluster.endpoints),
                COORDINATOR_TOKEN_FILE=str(cluster.token_file),
                COORDINATOR_STATE_FILE=str(tmp_path / "no-local.json"))


_SPAWNED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_leftover_processes():
    """A failed test leaves no background CLI process behind (they run in sessions of their own)."""
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _background(env: dict, tmp_path: pathlib.Path, name: str, *args: str) -> tuple[subprocess.Popen, pathlib.Path]:
    """A CLI process in the background, stdout and stderr to files under tmp_path."""
    out = tmp_path / f"{name}.out"
    with open(out, "w") as stdout, open(tmp_path / f"{name}.err", "w") as stderr:
        proc = subprocess.Popen(invocation() + list(args), env=env, stdout=stdout, stderr=stderr,
                                start_new_session=True)
    _SPAWNED.append(proc)
    return proc, out


def _finish(proc: subprocess.Popen, sig: int | None = signal.SIGTERM, timeout_s: float = 30) -> int:
    if sig is not None and proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"{proc.args} did not exit within {timeout_s} s of signal {sig}")


def _revision(env: dict) -> int:
    doc = json.loads(_ok(env, "get", "", "--prefix", "--count-only", "-w", "json"))
    return doc["header"]["revision"]


def _put_revision(env: dict, *args: str) -> int:
    out = _ok(env, "put", *args).strip()
    assert out.startswith("OK revision="), out
    return int(out.removeprefix("OK revision="))


@pytest.mark.slow
def test_grant_put_with_lease_timetolive_lists_the_key_and_revoke_deletes_it(make_cluster, tmp_path) -> None:
    cluster = make_cluster(nodes=3)
    env = _env(cluster, tmp_path)
    granted = json.loads(_ok(env, "lease", "grant", "60", "-w", "json"))
    lease_id = granted["ID"]
    assert granted["TTL"] == 60 and isinstance(lease_id, int) and lease_id > 0
    other = _ok(env, "lease", "grant", "30").strip()  # simple: etcdctl's line, the id in decimal
    assert other.startswith("lease ") and other.endswith(" granted with TTL(30s)"), other
    other_id = int(other.split()[1])

    _put_revision(env, "svc/a", "1", "--lease", str(lease_id))
    _put_revision(env, "svc/b", "2", "--lease", str(lease_id))
    _put_revision(env, "plain", "3")
    line = _ok(env, "lease", "timetolive", str(lease_id), "--keys").strip()
    assert line.startswith(f"lease {lease_id} granted with TTL(60s), remaining("), line
    assert line.endswith("attached keys([svc/a svc/b])"), line
    ttl = json.loads(_ok(env, "lease", "timetolive", str(lease_id), "--keys", "-w", "json"))
    assert ttl["id"] == lease_id and ttl["granted-ttl"] == 60 and 0 < ttl["ttl"] <= 60
    assert ttl["keys_count"] == 2 and [base64.b64decode(k) for k in ttl["keys"]] == [b"svc/a", b"svc/b"]
    got = json.loads(_ok(env, "get", "svc/", "--prefix", "-w", "json"))
    assert [kv.get("lease") for kv in got["kvs"]] == [lease_id, lease_id]

    # the connection flags work after the lease subcommand too
    flags = ["--endpoints", ",".join(cluster.endpoints), "--token-file", str(cluster.token_file)]
    listed = _cli(dict(env, COORDINATOR_ENDPOINTS="", COORDINATOR_TOKEN_FILE=""), "lease", "list", *flags)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == ["found 2 leases", str(lease_id), str(other_id)]
    assert json.loads(_ok(env, "lease", "list", "-w", "json")) == {"leases": [{"id": lease_id}, {"id": other_id}]}
    assert _ok(env, "lease", "keepalive", str(lease_id), "--once").strip() == \
        f"lease {lease_id} keepalived with TTL(60)"

    assert _ok(env, "lease", "revoke", str(lease_id)).strip() == f"lease {lease_id} revoked (2 keys deleted)"
    with cluster.client() as client:
        assert [client.get(k) for k in ("svc/a", "svc/b", "plain")] == [None, None, b"3"]
    assert _ok(env, "lease", "list").splitlines() == ["found 1 lease", str(other_id)]
    assert json.loads(_ok(env, "lease", "revoke", str(other_id), "-w", "json")) == {"ID": other_id, "deleted": 0}

    for args in (["lease", "revoke", str(lease_id)], ["lease", "timetolive", str(lease_id)],
                 ["lease", "keepalive", str(lease_id)],
                 ["put", "k", "v", "--lease", str(lease_id)]):
        gone = _cli(env, *args)
        assert gone.returncode == 1, (args, gone.stdout, gone.stderr)
        assert f"lease {lease_id} does not exist" in gone.stderr and "grant a new one" in gone.stderr, gone.stderr
        assert gone.stderr.startswith(f"coordinator {' '.join(args[:2] if args[0] == 'lease' else args[:1])}: ")
    with cluster.client() as client:
        assert client.get("k") is None, "a put with a missing lease changes nothing"


def _is_lost(stderr: str) -> bool:
    return "does not exist" in stderr or "is gone" in stderr


@pytest.mark.slow
def test_a_lease_not_kept_alive_expires_and_its_key_disappears(make_cluster, tmp_path, wait_for) -> None:
    cluster = make_cluster(nodes=3)
    env = _env(cluster, tmp_path)
    for ttl in ("2", "4", "8"):  # a loaded machine may take longer than the TTL to start the put
        lease_id = json.loads(_ok(env, "lease", "grant", ttl, "-w", "json"))["ID"]
        put = _cli(env, "put", "ephemeral", "here", "--lease", str(lease_id))
        if put.returncode == 0:
            break
        assert put.returncode == 1 and _is_lost(put.stderr), put.stderr
    else:
        pytest.fail("every lease expired before the put that attaches a key to it")
    with cluster.client() as client:
        wait_for(lambda: client.get("ephemeral") is None, "the lease to expire and delete its key",
                 timeout_s=30, interval_s=0.2)
        assert lease_id not in client.leases()
    assert _cli(env, "get", "ephemeral").returncode == 3
    expired = _cli(env, "lease", "timetolive", str(lease_id))
    assert expired.returncode == 1 and "does not exist" in expired.stderr, expired.stderr


def _kept_alive(env: dict, tmp_path: pathlib.Path, wait_for, name: str, ttl: str,
                *flags: str) -> tuple[int, subprocess.Popen, pathlib.Path, pathlib.Path]:
    """A fresh lease and a `lease keepalive` process that has renewed it once. Granted again
    if it expired before the process was up (starting one can take longer than a 1 s TTL on a
    loaded machine): that is the race of a slow start, not the behaviour under test."""
    for attempt in range(3):
        lease_id = json.loads(_ok(env, "lease", "grant", ttl, "-w", "json"))["ID"]
        proc, out = _background(env, tmp_path, f"{name}{attempt}", "lease", "keepalive", str(lease_id),
                                *flags)
        err = tmp_path / f"{name}{attempt}.err"
        wait_for(lambda: out.read_text() or proc.poll() is not None, "the first keepalive")  # noqa: B023
        if proc.poll() is None:
            return lease_id, proc, out, err
        assert proc.returncode == 1 and _is_lost(err.read_text()), err.read_text()
    pytest.fail(f"three {ttl} s leases expired before `lease keepalive` could renew them")


@pytest.mark.slow
def test_lease_keepalive_in_the_background_keeps_a_1s_lease_alive_until_terminated(
        make_cluster, tmp_path, wait_for) -> None:
    cluster = make_cluster(nodes=3)
    env = _env(cluster, tmp_path)
    lease_id, keeper, out, err = _kept_alive(env, tmp_path, wait_for, "keepalive", "1")
    line = f"lease {lease_id} keepalived with TTL(1)"
    with cluster.client() as client:
        _put_revision(env, "held", "yes", "--lease", str(lease_id))
        kept_until = time.monotonic() + 3.5  # three and a half TTLs
        while time.monotonic() < kept_until:
            assert client.get("held") == b"yes", "the key vanished while its lease was kept alive"
            assert keeper.poll() is None, err.read_text()
            time.sleep(0.25)
        code = _finish(keeper, signal.SIGTERM)
        assert code == 0 and f"stopped; lease {lease_id} expires" in err.read_text(), err.read_text()
        lines = out.read_text().splitlines()
        assert len(lines) >= 4 and set(lines) == {line}, lines  # one a third of the TTL: ~10
        wait_for(lambda: client.get("held") is None, "the key to vanish once nobody keeps its lease",
                 timeout_s=30, interval_s=0.2)

        # a lease revoked under a running keepalive: it says so and exits 1
        other, keeper, out, err = _kept_alive(env, tmp_path, wait_for, "revoked", "3", "-w", "json")
        assert json.loads(out.read_text().splitlines()[0]) == {"ID": other, "TTL": 3}
        _ok(env, "lease", "revoke", str(other))
        code = _finish(keeper, None)  # within a keepalive interval (a third of the TTL)
        assert code == 1 and f"lease {other} is gone" in err.read_text(), (code, err.read_text())
        assert "lease grant" in err.read_text()


@pytest.mark.slow
def test_watch_prints_the_changes_made_after_it_in_revision_order(make_cluster, tmp_path, wait_for) -> None:
    cluster = make_cluster(nodes=3)
    env = _env(cluster, tmp_path)
    _put_revision(env, "jobs/old", "before")  # before the watch's start: not printed
    start = _revision(env) + 1
    watch = subprocess.Popen(invocation() + ["watch", "jobs/", "--prefix", "--rev", str(start),
                                               "--limit", "3", "-w", "json"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        revs = [_put_revision(env, "jobs/1", "one"), _put_revision(env, "other/x", "not watched"),
                _put_revision(env, "jobs/2", "two"), _put_revision(env, "jobs/1", "uno")]
        out, err = watch.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(watch.pid, signal.SIGKILL)
        out, err = watch.communicate()
        pytest.fail(f"the watch did not print 3 events and exit: {out!r} {err!r}")
    assert watch.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert revs == sorted(revs) and revs[0] == start
    assert [e["type"] for e in events] == ["PUT", "PUT", "PUT"]
    got = [(base64.b64decode(e["kv"]["key"]), base64.b64decode(e["kv"]["value"]), e["kv"]["mod_revision"])
           for e in events]
    assert got == [(b"jobs/1", b"one", revs[0]), (b"jobs/2", b"two", revs[2]), (b"jobs/1", b"uno", revs[3])]
    assert events[0]["prev_kv"] is None and events[2]["kv"]["version"] == 2
    assert events[2]["kv"]["create_revision"] == revs[0]
    assert base64.b64decode(events[2]["prev_kv"]["value"]) == b"one"

    # simple output (etcdctl's lines) of a range, replayed from the history: a delete prints no value
    assert _ok(env, "delete", "jobs/2").strip() == "deleted"
    replay = _ok(env, "watch", "jobs/1", "jobs/3", "--rev", str(revs[2]), "--limit", "3")
    assert replay.splitlines() == ["PUT", "jobs/2", "two", "PUT", "jobs/1", "uno", "DELETE", "jobs/2"]

    # Ctrl-C and SIGTERM end a watch that waits for changes: exit 0, at once (within its long poll)
    for sig in (signal.SIGINT, signal.SIGTERM):
        idle, out = _background(env, tmp_path, f"idle-{sig}", "watch", f"idle/{sig}",
                                "--rev", str(_revision(env) + 1))
        _put_revision(env, f"idle/{sig}", "ready")  # printed once the watch runs: it waits then
        wait_for(lambda: "ready" in out.read_text() or idle.poll() is not None,  # noqa: B023
                 "the watch to print its first event")
        assert _finish(idle, sig, timeout_s=10) == 0, (tmp_path / f"idle-{sig}.err").read_text()
        assert out.read_text().splitlines() == ["PUT", f"idle/{sig}", "ready"]


def test_bad_ids_ttls_and_watch_flags_are_refused_with_what_to_give(tmp_path, monkeypatch, capsys) -> None:
    """Usage errors: exit 2 before anything is sent (the endpoint here answers nothing). Run
    in this process (argparse's exit, or main's return), and once as a process."""
    from coordinator.cli import main

    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {"COORDINATOR_ENDPOINTS": "127.0.0.1:9", "COORDINATOR_TOKEN_FILE": str(token),
           "COORDINATOR_STATE_FILE": str(tmp_path / "none.json")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cases = [
        (["lease", "revoke", "abc"], ["lease id 'abc' is not a decimal integer", "lease grant"]),
        (["lease", "timetolive", "694d5765fc71500b"], ["not a decimal integer", "etcdctl prints them in hex"]),
        (["lease", "keepalive", "0"], ["lease id 0 is out of range"]),
        (["lease", "keepalive", "-3", "--once"], ["lease id '-3' is not a decimal integer"]),
        (["put", "k", "v", "--lease", "x1"], ["lease id 'x1' is not a decimal integer"]),
        (["lease", "grant", "-5"], ["TTL '-5' is not a number of seconds > 0"]),
        (["lease", "grant", "0"], ["TTL '0' is not a number of seconds > 0"]),
        (["lease", "grant", "ten"], ["TTL 'ten' is not a number of seconds > 0"]),
        (["lease", "grant", "0.1"], ["coordinator lease grant: TTL 0.1s is out of range", "0.5.."]),
        (["watch", "k", "--rev", "0"], ["coordinator watch: --rev must be a revision >= 1"]),
        (["watch", "k", "z", "--prefix"], ["give --prefix or RANGE_END, not both"]),
        (["watch", "k", "--limit", "-1"], ["--limit must be >= 0"]),
    ]
    for args, needles in cases:
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        for needle in needles:
            assert needle in err, (args, err)
    result = _cli(dict(os.environ, **env), "lease", "revoke", "12x")
    assert result.returncode == 2 and "lease id '12x' is not a decimal integer" in result.stderr, result.stderr
