"""The admin key API (`/gateway/keys`) on a real gateway and SQLite ledger: a key created over
the API works at once, renewals and limit changes apply, a rotation's grace holds, a
revocation is refused, config keys are read-only, bad input changes nothing, and a restart
keeps every key and revocation."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import RESEARCH_KEY, Gateway, GatewayFactory, sha

ADMIN_KEY = "mgw-admin-keys-test-secret"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a b c"}]}


@pytest.fixture(autouse=True)
def _admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", ADMIN_KEY)


async def call(
    gateway: Gateway, method: str, path: str, body: Any = None, key: str | None = ADMIN_KEY,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any]]:  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, str(gateway.server.make_url(path)), json=body, data=raw, headers=headers
        ) as answer,
    ):
        return answer.status, await answer.json()


async def chat(gateway: Gateway, secret: str) -> int:
    try:
        await gateway.client(secret).chat.completions.create(**CHAT)
    except openai.APIStatusError as error:
        return error.status_code
    return 200


async def chat_error(gateway: Gateway, secret: str) -> tuple[int, str | None]:
    try:
        await gateway.client(secret).chat.completions.create(**CHAT)
    except openai.APIStatusError as error:
        return error.status_code, error.code
    return 200, None


async def test_a_key_created_over_the_api_works_at_once_and_only_its_digest_is_kept(
    gateway: Gateway,
) -> None:
    status, created = await call(
        gateway, "POST", "/gateway/keys", {"team": "research", "id": "ci-job", "expires": "30d"}
    )
    assert status == 201
    secret = created.pop("key")
    assert secret.startswith("mgw-") and len(secret) > 40
    assert created["id"] == "ci-job" and created["team"] == "research"
    assert created["source"] == "api" and created["revoked_at"] is None
    assert created["sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    assert created["created_at"].endswith("Z") and created["limits"] == {}
    assert await chat(gateway, secret) == 200
    rows = await gateway.rows()
    assert [(r["team"], r["key_id"], r["status"]) for r in rows] == [("research", "ci-job", 200)]
    with sqlite3.connect(gateway.ledger_path) as db:
        stored = db.execute("SELECT id, team, sha256 FROM api_keys").fetchall()
        dumped = "\n".join(db.iterdump())
    assert stored == [("ci-job", "research", created["sha256"])]
    assert secret not in dumped  # only the digest


async def test_list_and_get_show_config_keys_and_this_months_usage(gateway: Gateway) -> None:
    _, created = await call(gateway, "POST", "/gateway/keys", {"team": "product", "id": "web-2"})
    assert await chat(gateway, created["key"]) == 200
    status, listed = await call(gateway, "GET", "/gateway/keys?team=product")
    assert status == 200 and listed["object"] == "list"
    assert [(k["id"], k["source"]) for k in listed["data"]] == [
        ("product-web", "config"), ("web-2", "api"),
    ]  # fmt: skip
    config_key = listed["data"][0]
    assert config_key["sha256"] == sha("mgw-test-product-secret")
    assert config_key["created_at"] is None
    status, got = await call(gateway, "GET", "/gateway/keys/web-2")
    [row] = [r for r in await gateway.rows() if r["key_id"] == "web-2"]
    assert status == 200
    assert got["usage"] == {
        "requests": 1,
        "input_tokens": row["input_tokens"],
        "output_tokens": row["output_tokens"],
        "cost_usd": row["cost_nanousd"] / 1e9,
    }
    assert got["spend_usd"] == {
        "today": row["cost_nanousd"] / 1e9,
        "month": row["cost_nanousd"] / 1e9,
    }
    status, _ = await call(gateway, "GET", "/gateway/keys/research-dev")
    assert status == 200


async def test_a_renewal_and_a_limit_change_apply_at_once(gateway: Gateway) -> None:
    _, created = await call(
        gateway, "POST", "/gateway/keys",
        {"team": "research", "id": "batch", "limits": {"requests_per_day": 1}},
    )  # fmt: skip
    secret = created["key"]
    assert await chat(gateway, secret) == 200
    assert await chat(gateway, secret) == 429
    status, patched = await call(
        gateway, "PATCH", "/gateway/keys/batch",
        {"limits": {"requests_per_day": 3}, "expires": "2099-12-31"},
    )  # fmt: skip
    assert status == 200
    assert patched["limits"] == {"requests_per_day": 3} and patched["expires"] == "2099-12-31"
    assert await chat(gateway, secret) == 200  # 2 of 3 used: the day's count is kept
    assert await chat(gateway, secret) == 200
    assert await chat(gateway, secret) == 429
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            str(gateway.server.make_url("/gateway/me")),
            headers={"Authorization": f"Bearer {secret}"},
        ) as answer,
    ):
        me = await answer.json()
    assert me["key_id"] == "batch" and me["expires"] == "2099-12-31"
    assert me["limits"]["requests_per_day"]["limit"] == 3


async def test_a_rotation_keeps_the_old_secret_for_its_grace_only(gateway: Gateway) -> None:
    _, created = await call(gateway, "POST", "/gateway/keys", {"team": "research", "id": "rot"})
    old = created["key"]
    status, rotated = await call(gateway, "POST", "/gateway/keys/rot/rotate", {"grace_s": 1.5})
    assert status == 200
    new = rotated["key"]
    assert new != old and rotated["sha256"] == hashlib.sha256(new.encode()).hexdigest()
    started = time.monotonic()
    assert await chat(gateway, new) == 200
    assert await chat(gateway, old) == 200  # within its grace
    await asyncio.sleep(max(0.0, 1.6 - (time.monotonic() - started)))
    assert await chat_error(gateway, old) == (401, "invalid_api_key")
    assert await chat(gateway, new) == 200
    _, again = await call(gateway, "POST", "/gateway/keys/rot/rotate", {})
    assert await chat_error(gateway, new) == (401, "invalid_api_key")  # no grace by default
    assert await chat(gateway, again["key"]) == 200


async def test_a_revoked_key_is_refused_as_revoked_and_stays_listed(gateway: Gateway) -> None:
    _, created = await call(gateway, "POST", "/gateway/keys", {"team": "research", "id": "gone"})
    secret = created["key"]
    _, rotated = await call(gateway, "POST", "/gateway/keys/gone/rotate", {"grace_s": 600})
    assert await chat(gateway, secret) == 200  # in its grace
    status, revoked = await call(gateway, "DELETE", "/gateway/keys/gone")
    assert (status, revoked) == (200, {"id": "gone", "revoked": True})
    assert await chat_error(gateway, rotated["key"]) == (401, "key_revoked")
    assert await chat_error(gateway, secret) == (401, "invalid_api_key")  # its grace ended
    _, listed = await call(gateway, "GET", "/gateway/keys?team=research")
    [gone] = [k for k in listed["data"] if k["id"] == "gone"]
    assert gone["revoked_at"] is not None
    assert await call(gateway, "DELETE", "/gateway/keys/gone") == (200, revoked)
    status, body = await call(gateway, "PATCH", "/gateway/keys/gone", {"expires": "90d"})
    assert (status, body["error"]["code"]) == (409, "key_revoked")


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/gateway/keys", {"id": "x"}, 400, "invalid_request"),
        ("POST", "/gateway/keys", {"team": "nobody"}, 404, "team_not_found"),
        ("POST", "/gateway/keys", {"team": "research", "id": "research-dev"}, 409, "key_exists"),
        ("POST", "/gateway/keys", {"team": "research", "id": "a b"}, 400, "invalid_request"),
        ("POST", "/gateway/keys", {"team": "research", "expires": "2020-01-01"}, 400,
         "invalid_request"),
        ("POST", "/gateway/keys", {"team": "research", "limits": {"requests_per_day": -1}}, 400,
         "invalid_request"),
        ("POST", "/gateway/keys", {"team": "research", "limits": {"nope": 1}}, 400,
         "invalid_request"),
        ("POST", "/gateway/keys", {"team": "research", "colour": "red"}, 400, "invalid_request"),
        ("POST", "/gateway/keys", [1, 2], 400, "invalid_request"),
        ("PATCH", "/gateway/keys/research-dev", {"expires": "90d"}, 409, "key_managed_by_config"),
        ("POST", "/gateway/keys/research-dev/rotate", {}, 409, "key_managed_by_config"),
        ("DELETE", "/gateway/keys/research-dev", None, 409, "key_managed_by_config"),
        ("GET", "/gateway/keys/nobody", None, 404, "key_not_found"),
        ("PATCH", "/gateway/keys/nobody", {}, 404, "key_not_found"),
        ("GET", "/gateway/keys?team=nobody", None, 404, "team_not_found"),
    ],
)  # fmt: skip
async def test_bad_input_gets_a_clear_error_and_changes_nothing(
    gateway: Gateway, method: str, path: str, body: Any, status: int, code: str
) -> None:
    answer = await call(gateway, method, path, body)
    assert (answer[0], answer[1]["error"]["code"]) == (status, code)
    assert answer[1]["error"]["message"]
    _, listed = await call(gateway, "GET", "/gateway/keys")
    assert [k["source"] for k in listed["data"]] == ["config"] * 4
    assert await chat(gateway, RESEARCH_KEY) == 200


async def test_a_body_that_is_not_json_or_too_large_is_refused(gateway: Gateway) -> None:
    status, body = await call(gateway, "POST", "/gateway/keys", raw=b"team=research")
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    status, body = await call(gateway, "POST", "/gateway/keys", raw=b'{"team": "' + b"r" * 70_000)
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    assert "larger than" in body["error"]["message"]


@pytest.mark.parametrize("key", [None, "wrong", RESEARCH_KEY])
async def test_only_the_admin_may_use_the_key_api(gateway: Gateway, key: str | None) -> None:
    status, body = await call(gateway, "POST", "/gateway/keys", {"team": "research"}, key=key)
    assert (status, body["error"]["code"]) == (401, "invalid_admin_key")
    status, body = await call(gateway, "GET", "/gateway/keys", key=key)
    assert (status, body["error"]["code"]) == (401, "invalid_admin_key")


async def test_a_restart_keeps_every_api_key_and_revocation(
    make_gateway: GatewayFactory, tmp_path
) -> None:
    ledger = tmp_path / "shared.sqlite3"
    first = await make_gateway(ledger_path=ledger)
    _, kept = await call(first, "POST", "/gateway/keys", {"team": "research", "id": "kept"})
    _, gone = await call(first, "POST", "/gateway/keys", {"team": "research", "id": "gone"})
    await call(first, "DELETE", "/gateway/keys/gone")
    await first.server.close()
    second = await make_gateway(ledger_path=ledger)
    assert await chat(second, kept["key"]) == 200
    assert await chat_error(second, gone["key"]) == (401, "key_revoked")


async def test_a_change_on_one_replica_is_in_force_on_another_within_2_s(
    make_gateway: GatewayFactory, tmp_path
) -> None:
    ledger = tmp_path / "shared.sqlite3"
    one = await make_gateway(ledger_path=ledger)
    two = await make_gateway(ledger_path=ledger)
    _, created = await call(one, "POST", "/gateway/keys", {"team": "research", "id": "both"})
    started = time.monotonic()
    while await chat(two, created["key"]) != 200:
        assert time.monotonic() - started < 2.0, "not in force on the other replica in 2 s"
        await asyncio.sleep(0.05)
    await call(one, "DELETE", "/gateway/keys/both")
    started = time.monotonic()
    while await chat(two, created["key"]) != 401:
        assert time.monotonic() - started < 2.0, "still accepted by the other replica after 2 s"
        await asyncio.sleep(0.05)
    assert await chat_error(two, created["key"]) == (401, "key_revoked")


async def test_two_replicas_on_postgres_share_keys_and_revocations(
    make_gateway: GatewayFactory, postgres_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    with postgres_server.new_database() as dsn:
        monkeypatch.setenv("TEST_KEYS_PG_DSN", dsn)
        storage = ("backend: postgres", "dsn_env: TEST_KEYS_PG_DSN")
        one = await make_gateway(storage_extra=storage)
        two = await make_gateway(storage_extra=storage)
        _, created = await call(
            one, "POST", "/gateway/keys",
            {"team": "research", "id": "pg-key", "limits": {"spend_per_day_usd": 2.5}},
        )  # fmt: skip
        assert created["limits"] == {"spend_per_day_usd": 2.5}
        started = time.monotonic()
        while await chat(two, created["key"]) != 200:
            assert time.monotonic() - started < 2.0, "not in force on the other replica in 2 s"
            await asyncio.sleep(0.05)
        _, listed = await call(two, "GET", "/gateway/keys?team=research")
        assert [k["id"] for k in listed["data"] if k["source"] == "api"] == ["pg-key"]
        await call(two, "DELETE", "/gateway/keys/pg-key")
        started = time.monotonic()
        while await chat(one, created["key"]) != 401:
            assert time.monotonic() - started < 2.0, "still accepted by the other replica after 2 s"
            await asyncio.sleep(0.05)
        assert await chat_error(one, created["key"]) == (401, "key_revoked")
        await one.server.close()
        await two.server.close()


def test_a_reload_adding_a_config_key_with_an_api_keys_id_is_refused_with_its_line(
    tmp_path,
) -> None:
    from gateway.access.store import StoredKey
    from gateway.config.loader import load_config
    from gateway.server import api_key_clashes

    path = tmp_path / "gateway.yaml"
    path.write_text(
        "teams:\n"
        "  research:\n"
        "    keys:\n"
        f"      - id: research-dev\n        sha256: {sha('a')}\n"
        f"      - id: 'ci-job'\n        sha256: {sha('b')}\n"
    )
    config = load_config(path)
    issued = StoredKey(id="ci-job", team="research", sha256=sha("c"), expires=None, limits={},
                       created_at=0.0)  # fmt: skip
    assert api_key_clashes(config, [issued], path) == [
        f"{path}:6: key id 'ci-job' is held by a key issued over the admin API (revoked ones "
        "keep theirs): choose another id"
    ]
    assert api_key_clashes(config, [], path) == []


async def test_under_workers_with_limits_in_memory_a_keys_limits_are_refused(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_WORKERS", "2")  # what `serve --workers 2` sets in each worker
    status, body = await call(
        gateway, "POST", "/gateway/keys", {"team": "research", "limits": {"requests_per_day": 5}}
    )
    assert (status, body["error"]["code"], body["error"]["param"]) == (
        400, "invalid_request", "limits",
    )  # fmt: skip
    assert "limits.backend: redis" in body["error"]["message"]
    status, _ = await call(gateway, "POST", "/gateway/keys", {"team": "research"})
    assert status == 201
