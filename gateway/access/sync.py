"""API keys kept in force on every replica: the store is looked at every second (one
aggregate query), and re-read when anything changed there."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from gateway.access.store import KeyStore, KeyStoreUnavailable, StoredKey
from gateway.loop import cancel_and_wait

log = logging.getLogger("gateway.keys")

SYNC_INTERVAL_S = 1.0  # a change on another replica is in force here within about this


class KeySync:
    def __init__(
        self,
        store: KeyStore,
        apply: Callable[[list[StoredKey]], None],
        interval_s: float = SYNC_INTERVAL_S,
    ) -> None:
        self.store = store
        self._apply = apply
        self._interval_s = interval_s
        self._marker: tuple[Any, ...] | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self.refresh(force=True)
        self._task = asyncio.create_task(self._watch(), name="key-sync")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def refresh(self, force: bool = False) -> None:
        """Re-read the keys if the store changed (or `force`), and put them in force."""
        async with self._lock:
            marker = await self.store.changes_marker()
            if force or marker != self._marker:
                keys = await self.store.all()
                self._marker = marker
                self._apply(keys)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.refresh()
            except KeyStoreUnavailable as error:
                if not self._failing:
                    log.error("API keys not refreshed (the ones in force stay): %s", error)
                self._failing = True
                continue
            if self._failing:
                log.info("API keys refreshed again")
            self._failing = False
