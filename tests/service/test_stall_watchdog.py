"""A node's log says why it neither votes nor answers (issue 17, point 4): a late tick logs
the event-loop lag, and a loop that has not ticked for ``stall_dump_s`` has its stack logged
by a watchdog thread -- here a callback that blocks the loop is named in that stack."""

from __future__ import annotations

import asyncio
import logging
import time

from coordinator.server import CoordinatorServer, ServerConfig


def _block_the_loop_for_a_while() -> None:
    time.sleep(0.8)  # what a synchronous snapshot or fsync on the loop used to do


def test_a_blocked_loop_is_logged_with_where_it_is(tmp_path, caplog) -> None:
    config = ServerConfig(node_id=1, peers={1: ("127.0.0.1", 0), 2: ("127.0.0.1", 1),
                                            3: ("127.0.0.1", 1)},
                          data_dir=tmp_path / "node", token=b"t" * 32, fsync=False,
                          stall_dump_s=0.3)

    async def main() -> None:
        server = CoordinatorServer(config)
        await server.start()
        try:
            await asyncio.sleep(0.2)
            asyncio.get_running_loop().call_soon(_block_the_loop_for_a_while)
            await asyncio.sleep(0.3)
        finally:
            await server.stop()

    with caplog.at_level(logging.WARNING, logger="coordinator.server"):
        asyncio.run(main())
    text = caplog.text
    assert "has not ticked for" in text and "_block_the_loop_for_a_while" in text, text
    assert "the event loop was blocked for" in text
    assert "stopped (SIGSTOP" not in text
