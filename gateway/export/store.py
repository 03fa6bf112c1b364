"""The exports' state in the ledger's database (SQLite or Postgres), beside `requests`.

`exports` holds each export's cursor: the (change_seq, request_id) of the last row it has
reached, in the order the ledger's commits stamped them (`gateway.ledger.writer`). A lease in
the same row makes one exporter at a time work on an export, whichever replica or command it
runs in: it is taken (or renewed) with one conditional UPDATE, and every commit of progress is
fenced by it, so an exporter that lost its lease writes nothing. `export_rows` says what each
reached row became: sent (with the value the billing system holds), refused, or skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config.loader import StorageConfig
from gateway.ledger.side_tables import PostgresSideTable, SqliteSideTable
from gateway.ledger.storage import StorageError, postgres_dsn
from gateway.ledger.writer import EXPORT_COLUMN_TYPES, EXPORT_ROW_COLUMN_TYPES

SENT, REFUSED, SKIPPED = "sent", "refused", "skipped"
BILLABLE = "status >= 200 AND status < 300"  # SPEC: upstream 2xx, whatever the outcome
_AFTER = "(change_seq > ? OR (change_seq = ? AND request_id > ?))"
LEDGER_FIELDS = (
    "request_id, change_seq, started_at, team, key_id, model, input_tokens, output_tokens, "
    "cost_nanousd"
)


class ExportUnavailable(StorageError):
    """The exports' tables cannot be read or written now."""


@dataclass(frozen=True, slots=True)
class LedgerRow:
    request_id: str
    change_seq: int
    started_at: float
    team: str | None
    key_id: str | None
    model: str | None
    input_tokens: int
    output_tokens: int
    cost_nanousd: int

    @property
    def position(self) -> tuple[int, str]:
        return self.change_seq, self.request_id


@dataclass(frozen=True, slots=True)
class DoneRow:
    """What an export did with a row (`export_rows`)."""

    request_id: str
    event_id: str
    value: int | None  # what the billing system holds (sent), or would have (refused, skipped)
    state: str
    at: float
    note: str | None = None
    ledger_value: int | None = None  # repriced after it was sent, and not corrected


@dataclass(frozen=True, slots=True)
class ExportState:
    name: str
    kind: str
    cursor: tuple[int, str]
    holder: str | None
    lease_until: float | None
    delivered: int
    last_delivered_at: float | None
    last_error: str | None
    last_error_at: float | None


_ENSURE = (
    "INSERT INTO exports (name, kind, cursor_seq, cursor_id, delivered, created_at) "
    "SELECT ?, ?, seq + 1, '', 0, ? FROM change_clock "
    "WHERE NOT EXISTS (SELECT 1 FROM exports WHERE name = ?)"
)  # a new export starts after the rows already written: `export --since` sends those
_LEASE = (
    "UPDATE exports SET holder = ?, lease_until = ? "
    "WHERE name = ? AND (holder = ? OR holder IS NULL OR lease_until < ?)"
)
_RELEASE = "UPDATE exports SET holder = NULL, lease_until = NULL WHERE name = ? AND holder = ?"
_STATE = f"SELECT {', '.join(EXPORT_COLUMN_TYPES)} FROM exports WHERE name = ?"
_ROWS_AFTER = (
    f"SELECT {LEDGER_FIELDS} FROM requests WHERE {_AFTER} AND {BILLABLE} "
    "ORDER BY change_seq, request_id LIMIT ?"
)
_ROWS_SINCE = (
    f"SELECT {LEDGER_FIELDS} FROM requests "
    f"WHERE (started_at > ? OR (started_at = ? AND request_id > ?)) AND {BILLABLE} "
    "ORDER BY started_at, request_id LIMIT ?"
)
_DONE_COLUMNS = ("request_id", "event_id", "value", "state", "at", "note", "ledger_value")
_DONE = (
    "SELECT " + ", ".join(_DONE_COLUMNS) + " FROM export_rows WHERE export = ? AND request_id IN "
)
_LISTED = (
    "SELECT " + ", ".join(_DONE_COLUMNS) + " FROM export_rows "
    "WHERE export = ? AND (state = ? OR (? = 'repriced' AND ledger_value IS NOT NULL)) "
    "ORDER BY at LIMIT ?"
)
_COUNT_LISTED = (
    "SELECT COUNT(*) FROM export_rows "
    "WHERE export = ? AND (state = ? OR (? = 'repriced' AND ledger_value IS NOT NULL))"
)
_PUT_DONE = (
    f"INSERT INTO export_rows ({', '.join(EXPORT_ROW_COLUMN_TYPES)}) "
    f"VALUES ({', '.join('?' * len(EXPORT_ROW_COLUMN_TYPES))}) "
    "ON CONFLICT (export, request_id) DO UPDATE SET event_id = excluded.event_id, "
    "value = excluded.value, state = excluded.state, at = excluded.at, note = excluded.note, "
    "ledger_value = excluded.ledger_value"
)
_PROGRESS = (
    "UPDATE exports SET cursor_seq = ?, cursor_id = ?, delivered = delivered + ?, "
    "last_delivered_at = COALESCE(?, last_delivered_at), lease_until = ? "
    "WHERE name = ? AND holder = ?"
)
_ERROR = "UPDATE exports SET last_error = ?, last_error_at = ? WHERE name = ? AND holder = ?"
_CLEAR_ERROR = "UPDATE exports SET last_error = NULL WHERE name = ? AND holder = ?"


def lag_sql(teams: int) -> str:
    """Billable rows after the cursor, of the teams the export sends (`teams` of them)."""
    marks = ", ".join("?" * teams)
    team_filter = f" AND team IN ({marks})" if teams else ""
    return f"SELECT COUNT(*) FROM requests WHERE {_AFTER} AND {BILLABLE}{team_filter}"


class ExportStore:
    """The exports' tables through a side connection of the ledger's database."""

    def __init__(self, table: SqliteSideTable | PostgresSideTable) -> None:
        self.table = table

    async def open(self) -> None:
        await self.table.open()

    async def close(self) -> None:
        await self.table.close()

    async def ensure(self, name: str, kind: str, now: float) -> None:
        await self._change([(_ENSURE, [(name, kind, now, name)])])

    async def take_lease(self, name: str, holder: str, now: float, until: float) -> bool:
        return await self._change([(_LEASE, [(holder, until, name, holder, now)])], guard=0)

    async def release(self, name: str, holder: str) -> None:
        await self._change([(_RELEASE, [(name, holder)])])

    async def state(self, name: str) -> ExportState | None:
        found = await self._fetch(_STATE, (name,))
        if not found:
            return None
        row = dict(zip(EXPORT_COLUMN_TYPES, found[0], strict=True))
        return ExportState(
            name=row["name"], kind=row["kind"], cursor=(row["cursor_seq"], row["cursor_id"]),
            holder=row["holder"], lease_until=row["lease_until"], delivered=row["delivered"],
            last_delivered_at=row["last_delivered_at"], last_error=row["last_error"],
            last_error_at=row["last_error_at"],
        )  # fmt: skip

    async def rows_after(self, cursor: tuple[int, str], limit: int) -> list[LedgerRow]:
        seq, request_id = cursor
        found = await self._fetch(_ROWS_AFTER, (seq, seq, request_id, limit))
        return [LedgerRow(*row) for row in found]

    async def rows_since(self, after: tuple[float, str], limit: int) -> list[LedgerRow]:
        started_at, request_id = after
        found = await self._fetch(_ROWS_SINCE, (started_at, started_at, request_id, limit))
        return [LedgerRow(*row) for row in found]

    async def done(self, name: str, request_ids: Sequence[str]) -> dict[str, DoneRow]:
        if not request_ids:
            return {}
        sql = _DONE + "(" + ", ".join("?" * len(request_ids)) + ")"
        found = await self._fetch(sql, (name, *request_ids))
        return {row[0]: DoneRow(*row) for row in found}

    async def listed(self, name: str, state: str, limit: int) -> tuple[int, list[DoneRow]]:
        """The rows of a state (`refused`, `skipped`, or `repriced`: sent, then repriced
        without a correction): how many, and the first `limit`."""
        found = await self._fetch(_LISTED, (name, state, state, limit))
        return await self.count_listed(name, state), [DoneRow(*row) for row in found]

    async def count_listed(self, name: str, state: str) -> int:
        (count,) = (await self._fetch(_COUNT_LISTED, (name, state, state)))[0]
        return int(count)

    async def lag(self, cursor: tuple[int, str], teams: Sequence[str] | None) -> int:
        """Billable rows after the cursor (of `teams`; None: every team)."""
        seq, request_id = cursor
        chosen = list(teams or ())
        if teams is not None and not chosen:
            return 0
        (count,) = (await self._fetch(lag_sql(len(chosen)), (seq, seq, request_id, *chosen)))[0]
        return int(count)

    async def progress(
        self,
        name: str,
        holder: str,
        done: Sequence[DoneRow],
        cursor: tuple[int, str],
        delivered: int,
        now: float,
        lease_until: float,
    ) -> bool:
        """Record what was done and move the cursor, in one transaction, only while `holder`
        holds the lease (False: it does not, and nothing was written)."""
        rows = [(name, row.request_id, row.event_id, row.value, row.state, row.at, row.note,
                 row.ledger_value) for row in done]  # fmt: skip
        steps = [
            (
                _PROGRESS,
                [(*cursor, delivered, now if delivered else None, lease_until, name, holder)],
            ),  # fmt: skip
            (_PUT_DONE, rows),
        ]
        return await self._change(steps, guard=0)

    async def note_error(self, name: str, holder: str, error: str | None, now: float) -> None:
        if error is None:
            await self._change([(_CLEAR_ERROR, [(name, holder)])])
        else:
            await self._change([(_ERROR, [(error[:500], now, name, holder)])])

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if isinstance(self.table, SqliteSideTable):
            return [tuple(row) for row in await self.table.fetch(sql, params)]
        return [tuple(row) for row in await self.table.run("fetch", sql, *params)]

    async def _change(self, steps: list[Any], guard: int | None = None) -> bool:
        return await self.table.transaction(steps, guard)


def make_export_store(storage: StorageConfig) -> ExportStore:
    if storage.backend == "postgres":
        return ExportStore(
            PostgresSideTable(postgres_dsn(storage), ExportUnavailable, "exports tables")
        )
    return ExportStore(SqliteSideTable(Path(storage.sqlite_path), ExportUnavailable,
                                       "exports tables"))  # fmt: skip
