"""Background tasks: none may die silently.

A task that fails is logged as a `broker.error` event and declared fatal: the broker shuts down and exits
non-zero, so that systemd or any supervisor restarts it. A failure a task can recover from, it handles
itself; what reaches here is a bug or a state the broker cannot serve from.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from deadend.logs import BROKER, EventLog, sanitize


class Background:
    def __init__(self, log: EventLog, on_fatal: Callable[[str], None]) -> None:
        self.log = log
        self.on_fatal = on_fatal
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        why = f"{task.get_name()} failed: {sanitize(repr(exc), 512)}"
        self.log.error(BROKER, "broker.error", f"internal error: {why}; stopping")
        self.on_fatal(why)

    async def cancel_all(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
