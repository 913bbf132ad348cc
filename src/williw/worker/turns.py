"""Heavy request parts take turns on the event loop, one per loop iteration, so that a heartbeat never waits
behind more than one of them.

The worker answers everything from one asyncio loop. Each loop iteration first reads the sockets that are ready,
then runs every callback that was ready when it started. When 50 users plan back to back, up to 50 heavy parts
(listing the nodes, storing a 27 KB plan, rendering it) are ready at once; all of them ran before the loop read the
next heartbeat, and heartbeats waited ~100 ms behind them (p99 ~300 ms). Holding a lock across one ``sleep(0)``
lets only one heavy part run per iteration: a heartbeat waits for at most one (~1 ms), and the heavy parts still
use all the time heartbeats leave, in arrival order (asyncio's lock is FIFO).

On PostgreSQL a turn also spans the waits for the server (`Store.run`): the loop serves heartbeats meanwhile, and
user work stays one at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any


class Turns:
    """One turn at a time, at most one per loop iteration. Bound to the loop it is first used on."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self.loop = asyncio.get_running_loop()

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Run the body (synchronous work, no awaits) in its turn."""
        async with self._lock:
            yield
            # Hold the turn into the next iteration: whoever waits for it runs after the loop has read the
            # sockets again.
            await asyncio.sleep(0)


def turns_of(state: Any) -> Turns:
    """The app's `Turns` (in ``app.state``) for the running loop, made on first use."""
    turns = getattr(state, "turns", None)
    if turns is None or turns.loop is not asyncio.get_running_loop():
        turns = state.turns = Turns()
    return turns


__all__ = ["Turns", "turns_of"]
