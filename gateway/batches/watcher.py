"""Batch metering (SPEC "Every OpenAI surface"): a batch created through the gateway is billed
once, when it ends, at batch prices.

The gateway remembers each batch its create's answer names (`gateway.batches.store`). It looks
at the pending ones upstream, with the creating team's credentials, every
`batches.poll_interval_s`, and whenever a client's fetch of one passes through. A batch that
ended (`completed`, or `cancelled` / `expired` with the part that was done) is claimed, its
one row written — the batch's `usage`, or the sum of its output file's usages — flushed to
the ledger, counted against the team's and key's quotas, and only then marked billed. The row's
id comes from the batch id, so a crash between the row and the mark bills it again as the same
row, never as a second one. These looks are not calls: they write no rows of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.batches.store import BatchStore, NewBatch, PendingBatch, billed_request_id
from gateway.errors import UPSTREAM_UNAVAILABLE, GatewayError
from gateway.ledger.storage import StorageError
from gateway.ledger.writer import CallRecord
from gateway.limits.windows import Draw
from gateway.loop import pause
from gateway.metering.usage import Usage, usage_from_mapping, usage_of_object
from gateway.pipeline.call import apply_usage
from gateway.upstream.forward import read_answer

if TYPE_CHECKING:
    from gateway.pipeline.handler import Pipeline

log = logging.getLogger("gateway.batches")

ENDED = frozenset({"completed", "cancelled", "expired", "failed"})
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
# The counts of a `Usage` (every int field): what summing answers adds up.
_USAGE_FIELDS = tuple(f.name for f in fields(Usage) if f.type == "int")


class BatchWatcher:
    def __init__(self, pipeline: Pipeline, store: BatchStore, interval_s: float) -> None:
        self.pipeline = pipeline
        self.store = store
        self.interval_s = interval_s
        self._poller: asyncio.Task[None] | None = None
        self._looks: set[asyncio.Task[None]] = set()
        self._busy: set[str] = set()  # batch ids being looked at in this process

    async def start(self) -> None:
        self._poller = asyncio.create_task(self._poll(), name="batch-poll")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._looks:
            await asyncio.wait(self._looks, timeout=5)

    async def looks_done(self) -> None:
        """Wait for the looks that fetches started (a batch being billed now)."""
        if self._looks:
            await asyncio.wait(list(self._looks))

    # ------------------------------------------------------------ what the calls show

    async def created(self, team: str, key_id: str | None, body: dict[str, Any]) -> None:
        """A 2xx answer to `POST /v1/batches`: remember the batch it names."""
        batch_id = body.get("id")
        if type(batch_id) is not str:
            return
        model = body.get("model")
        await self.store.remember(
            NewBatch(
                batch_id,
                team,
                key_id,
                time.time(),
                _text(body.get("endpoint")),
                model if type(model) is str else None,
                _text(body.get("status")),
            )
        )
        self.fetched(body)

    def fetched(self, body: dict[str, Any]) -> None:
        """A batch object passed through (a client's fetch or cancel): bill it if it ended."""
        batch_id = body.get("id")
        if type(batch_id) is str and body.get("status") in ENDED:
            task = asyncio.create_task(self._look(batch_id, body), name=f"batch-{batch_id}")
            self._looks.add(task)
            task.add_done_callback(self._looks.discard)

    # ------------------------------------------------------------ looking upstream

    async def poll_once(self) -> None:
        """Look at every pending batch upstream; bill those that ended."""
        for batch in await self.store.pending():
            await self._look(batch.batch_id, None, batch)

    async def _poll(self) -> None:
        while True:
            await pause(self.interval_s)
            try:
                await self.poll_once()
            except (StorageError, OSError) as exc:
                log.warning("batches not looked at: %s", exc)
            except Exception:
                log.exception("batches not looked at")

    async def _look(
        self, batch_id: str, body: dict[str, Any] | None, batch: PendingBatch | None = None
    ) -> None:
        if batch_id in self._busy:
            return
        self._busy.add(batch_id)
        try:
            if batch is None:
                found = await self.store.pending(batch_id)
                if not found:
                    return  # not created through the gateway, or billed already
                batch = found[0]
            if body is None:
                body = await self._fetch_object(batch.team, f"/batches/{batch_id}")
                if body is None:
                    return
            await self._settle(batch, body)
        except (StorageError, GatewayError, OSError) as exc:
            log.warning("batch %s not billed yet: %s", batch_id, exc)
        finally:
            self._busy.discard(batch_id)

    async def _settle(self, batch: PendingBatch, body: dict[str, Any]) -> None:
        status = _text(body.get("status")) or "unknown"
        now = time.time()
        if status not in ENDED:
            await self.store.checked(batch.batch_id, status, now)
            return
        if not await self.store.claim(batch.batch_id, status, now):
            return  # billed, or another replica is billing it
        usage, model = await self._usage(batch, body)
        if usage is not None and status != "failed":
            self._write(batch, body, usage, model or batch.model)
            await self.pipeline.ledger.flush()
        await self.store.billed(batch.batch_id, time.time())
        log.info("batch %s (%s, team %s) billed", batch.batch_id, status, batch.team)

    async def _usage(
        self, batch: PendingBatch, body: dict[str, Any]
    ) -> tuple[Usage | None, str | None]:
        """The batch's own `usage`, else the sum of its output file's; and its model."""
        model = body.get("model") if type(body.get("model")) is str else None
        usage = usage_from_mapping(body.get("usage"))
        if usage is not None:
            return usage, model
        output = body.get("output_file_id")
        if type(output) is not str:
            return None, model
        content = await self._fetch(batch.team, f"/files/{output}/content")
        if content is None:
            raise GatewayError(UPSTREAM_UNAVAILABLE, f"the output file {output} could not be read")
        return summed_output_usage(content, model)

    async def _fetch(self, team: str, path: str) -> bytes | None:
        upstream = self.pipeline.upstream
        headers = upstream.upstream_headers(_NO_HEADERS, None, False, team)
        headers["Accept-Encoding"] = "identity"
        answer = await upstream.send("GET", path, headers, None)
        try:
            body = await read_answer(answer)
        finally:
            answer.release()
        if not 200 <= answer.status < 300:
            log.warning("batch look %s: the upstream answered %d", path, answer.status)
            return None
        return body

    async def _fetch_object(self, team: str, path: str) -> dict[str, Any] | None:
        content = await self._fetch(team, path)
        try:
            body = orjson.loads(content) if content is not None else None
        except orjson.JSONDecodeError:
            return None
        return body if type(body) is dict else None

    def _write(
        self, batch: PendingBatch, body: dict[str, Any], usage: Usage, model: str | None
    ) -> None:
        pipeline = self.pipeline
        now = time.time()
        record = CallRecord(
            request_id=billed_request_id(batch.batch_id),
            started_at=now,  # counted in the windows it is billed in, as its quotas count it
            finished_at=now,
            team=batch.team,
            key_id=batch.key_id,
            method="POST",
            path="/v1/batches",
            model=model,
            status=200,
            outcome="ok",
            upstream_request_id=batch.batch_id,
            batch=1,
        )
        apply_usage(record, usage)
        pipeline.price(record)
        pipeline.write_row(record, None)
        team = pipeline.config.teams.get(batch.team)
        key = next((k for k in team.keys if k.id == batch.key_id), None) if team else None
        if team is not None and key is not None:
            used = Draw(
                tokens=record.input_tokens + record.output_tokens,
                spend=record.cost_nanousd,
                slots=0,
            )
            pipeline.limiter.charge(team, key, used)


def summed_output_usage(content: bytes, model: str | None) -> tuple[Usage | None, str | None]:
    """The usages of a batch output file's answers (JSON lines), summed; the first model named
    when the batch named none. None: no line stated a usage."""
    total: Usage | None = None
    for line in content.splitlines():
        try:
            answer = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        response = answer.get("response") if type(answer) is dict else None
        result = response.get("body") if type(response) is dict else None
        if type(result) is not dict:
            continue
        if model is None and type(result.get("model")) is str:
            model = result["model"]
        usage = usage_of_object(result)
        if usage is None:
            continue
        if total is None:
            total = usage
            continue
        for name in _USAGE_FIELDS:
            setattr(total, name, getattr(total, name) + getattr(usage, name))
        total.audio_seconds += usage.audio_seconds  # the one count that is a float
    if total is not None:
        total.service_tier = None  # batch prices are their own tier
    return total, model


def _text(value: Any) -> str | None:
    return value if type(value) is str else None
