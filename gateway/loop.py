"""The event loop every process of the gateway runs on: uvloop where installed."""

from __future__ import annotations

import asyncio
import contextlib


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def pause(seconds: float) -> None:
    """A background loop's wait between passes. A cancel that landed inside the pass and came
    back as another error (asyncpg turns one into its own) ends the loop here: the loop's
    `except Exception` logged it, and `cancel_and_wait` would otherwise wait forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    await asyncio.sleep(seconds)


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Stop a background task and wait until it has (its cancellation is not an error)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
