"""reconcile: the gateway's ledger beside the provider's Usage and Costs APIs (the fake's,
answered from what it handled), per UTC day and model."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime

import pytest

from gateway.pricing.table import load_price_table
from tests.conftest import PRICING, Fake, Gateway, direct_client

ADMIN = "sk-admin-fake"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello to me"}]}


@pytest.fixture(autouse=True)
def _admin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_ADMIN_KEY", ADMIN)
    monkeypatch.setenv("OPENAI_ADMIN_KEY", ADMIN)


async def traffic(gateway: Gateway) -> None:
    client = gateway.client()
    for _ in range(3):
        await client.chat.completions.create(**CHAT, extra_headers={"x-fake-cached-tokens": "2"})
    stream = await client.chat.completions.create(**CHAT, stream=True)
    async for _ in stream:
        pass
    await client.responses.create(model="gpt-4o-mini", input="a b c")
    await client.embeddings.create(model="text-embedding-3-small", input="not a completion")
    await gateway.rows()


async def run_reconcile(gateway: Gateway) -> tuple[int, list[str]]:
    month = datetime.now(UTC).strftime("%Y-%m")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "reconcile", "--config", str(gateway.config.path),
        "--month", month, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    code = await process.wait()
    return code, (out or err).decode().splitlines()


async def test_reconcile_shows_zero_drift_against_the_fake_upstream(fake: Fake, make_gateway):
    import yaml

    fake.state.prices = load_price_table(yaml.safe_load(PRICING))
    gateway = await make_gateway()
    await traffic(gateway)
    code, lines = await run_reconcile(gateway)
    assert code == 0, lines
    today = datetime.now(UTC).date().isoformat()
    # input 3·7 + 7 + 3 = 31 (6 cached), output 5·12 = 60:
    # (31 − 6)·150 + 6·75 + 60·600 = 40,200 nano-USD
    assert lines[1:] == [
        f"{today} gpt-4o-mini: requests 5/5 (0.00%), input 31/31 (0.00%), "
        f"output 60/60 (0.00%), cost USD 0.0000402/0.0000402 (0.00%)"
    ]


async def test_reconcile_shows_drift_when_the_provider_saw_more(fake: Fake, make_gateway):
    import yaml

    fake.state.prices = load_price_table(yaml.safe_load(PRICING))
    gateway = await make_gateway()
    await traffic(gateway)
    direct = direct_client(fake)
    await direct.chat.completions.create(**CHAT)  # a call that bypassed the gateway
    await direct.close()
    code, lines = await run_reconcile(gateway)
    assert code == 0
    assert "requests 5/6 (-16.67%)" in lines[1]


async def test_reconcile_needs_the_admin_key(make_gateway, monkeypatch):
    gateway = await make_gateway()
    monkeypatch.delenv("OPENAI_ADMIN_KEY")
    code, lines = await run_reconcile(gateway)
    assert code == 2 and "OPENAI_ADMIN_KEY" in lines[0]
