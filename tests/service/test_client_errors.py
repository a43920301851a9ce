"""Errors a newcomer meets surface at once, saying what is wrong (issue 15, point 20): a
wrong token is refused in the handshake, and a value over the limit is refused before it is
sent -- neither waits out the client's 10 s timeout to end in a vague ``Unavailable``."""

from __future__ import annotations

import asyncio
import time

import pytest

from coordinator.client import AsyncClient, AuthenticationFailed, Client, RequestRejected
from coordinator.statemachine import MAX_VALUE_BYTES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
AT_ONCE_S = 3.0  # far below the 10 s client timeout these errors used to wait out


def test_wrong_token_is_reported_at_once_naming_the_token(make_cluster, tmp_path) -> None:
    cluster = make_cluster(nodes=3)
    wrong = tmp_path / "wrong-token"
    wrong.write_text("w" * 64 + "\n")
    started = time.monotonic()
    with Client(cluster.endpoints, token_file=wrong) as c, \
            pytest.raises(AuthenticationFailed, match="wrong-token") as err:
        c.put("k", "v")
    assert time.monotonic() - started < AT_ONCE_S
    assert "token" in str(err.value) and "refused" in str(err.value)

    async def async_get() -> None:
        async with AsyncClient(cluster.endpoints, token=b"x" * 40) as ac:
            await ac.get("k")

    started = time.monotonic()
    with pytest.raises(AuthenticationFailed, match="token passed to the client"):
        asyncio.run(async_get())
    assert time.monotonic() - started < AT_ONCE_S


def test_value_over_the_limit_is_refused_at_once_with_the_limit(make_cluster) -> None:
    cluster = make_cluster(nodes=1)
    with cluster.client() as c:
        assert c.put("fits", b"v" * MAX_VALUE_BYTES) > 0  # exactly 1 MiB is allowed
        started = time.monotonic()
        with pytest.raises(RequestRejected, match=f"{MAX_VALUE_BYTES} bytes") as err:
            c.put("big", b"v" * (MAX_VALUE_BYTES + 1))
        assert err.value.code == "bad_value"
        with pytest.raises(RequestRejected, match="frame limit"):  # over the 16 MiB frame
            c.put(b"k" * (17 << 20), b"v")
        assert time.monotonic() - started < AT_ONCE_S
        assert c.get("big") is None and c.get("fits") == b"v" * MAX_VALUE_BYTES

    async def async_put() -> None:
        async with AsyncClient(cluster.endpoints, token=cluster.token) as ac:
            await ac.put("big", "v" * (MAX_VALUE_BYTES + 1))

    started = time.monotonic()
    with pytest.raises(RequestRejected, match="1 MiB"):
        asyncio.run(async_put())
    assert time.monotonic() - started < AT_ONCE_S
