"""`metering-gateway demo`: the whole product in one offline command.

Starts the fake upstream and a gateway on free local ports with a throw-away config, sends a
few calls through the official openai SDK (one streamed, one over a limit), a Realtime
response over WebSocket and a batch, shows them arriving as meter events at a local fake of
Stripe (`export:`), and prints the report from the ledger.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import textwrap
from pathlib import Path

import aiohttp
import openai
import orjson
from aiohttp import web

from gateway.app import BATCHES, LEDGER, build_app
from gateway.billing.reports import ReportQuery, render, usage_rows
from gateway.config.loader import load_config
from gateway.devtools.fake_billing import FakeBilling, start_fake_billing
from gateway.devtools.fake_upstream import build_fake_app

DEMO_KEYS = {"research": "mgw-demo-research", "interns": "mgw-demo-interns"}
UPSTREAM_KEY = "sk-demo-upstream"
DEMO_STRIPE_KEY = "sk_test_demo_stripe"


async def _start(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server  # noqa: SLF001 - aiohttp exposes the bound port only here
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


def _config(folder: Path, upstream_port: int, billing_url: str) -> Path:
    def sha(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()

    path = folder / "gateway.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            upstream: {{base_url: "http://127.0.0.1:{upstream_port}/v1",
                        api_key_env: DEMO_UPSTREAM_KEY, forward_headers: ["x-fake-*"]}}
            storage: {{sqlite_path: {folder / "ledger.sqlite3"}, flush_interval_ms: 50}}
            log_calls: false
            pricing:
              models:
                gpt-4o-mini: {{input: 0.15, cached_input: 0.075, output: 0.60}}
                gpt-realtime: {{input: 4.00, cached_input: 0.40, output: 16.00}}
                text-embedding-3-small: {{input: 0.02}}
            teams:
              research:
                keys: [{{id: research-dev, sha256: {sha(DEMO_KEYS["research"])}}}]
              interns:
                limits: {{requests_per_minute: 2}}
                keys: [{{id: intern-laptop, sha256: {sha(DEMO_KEYS["interns"])}}}]
            export:
              - kind: stripe
                url: {billing_url}
                api_key_env: DEMO_STRIPE_KEY
                event_name: llm_spend
                customers: {{research: cus_research, interns: cus_interns}}
                interval_s: 0.1
            """
        )
    )
    return path


async def _realtime(base_url: str) -> str:
    """One Realtime response over a WebSocket (aiohttp's client: no extra package needed)."""
    url = base_url.replace("http", "ws", 1) + "/realtime?model=gpt-realtime"
    headers = {"Authorization": f"Bearer {DEMO_KEYS['research']}"}
    usage: dict = {}
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
        session = {"type": "realtime", "output_modalities": ["text"]}
        await ws.send_str(orjson.dumps({"type": "session.update", "session": session}).decode())
        text = {"type": "input_text", "text": "Say hello over the socket."}
        item = {"type": "message", "role": "user", "content": [text]}
        await ws.send_str(orjson.dumps({"type": "conversation.item.create", "item": item}).decode())
        await ws.send_str('{"type": "response.create"}')
        async for message in ws:
            event = orjson.loads(message.data)
            if event["type"] == "response.done":
                usage = event["response"]["usage"]
                break
    return (
        f"realtime:   1 response over WebSocket, {usage.get('input_tokens')} tokens in, "
        f"{usage.get('output_tokens')} out"
    )


async def _batch(client: openai.AsyncOpenAI, app: web.Application) -> str:
    """A batch of two chat calls: billed once, at batch prices, when its fetch shows it done."""
    lines = b"".join(
        orjson.dumps({"custom_id": f"q{n}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "gpt-4o-mini",
                               "messages": [{"role": "user", "content": f"question {n}"}]}})
        + b"\n"
        for n in (1, 2)
    )  # fmt: skip
    upload = await client.files.create(file=("batch.jsonl", lines), purpose="batch")
    batch = await client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = await client.batches.retrieve(batch.id)
    await app[BATCHES].looks_done()
    return f"batch:      {done.status}, {done.request_counts.completed} calls, billed once"


async def _traffic(base_url: str, app: web.Application) -> list[str]:
    said = []
    research = openai.AsyncOpenAI(base_url=base_url, api_key=DEMO_KEYS["research"], max_retries=0)
    reply = await research.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello to the demo."}]
    )
    said.append(f"chat:       {reply.choices[0].message.content!r}")
    stream = await research.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Stream please."}], stream=True
    )
    chunks = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    said.append(f"stream:     {len(chunks)} chunks, {''.join(chunks)[:40]!r}...")
    embedding = await research.embeddings.create(
        model="text-embedding-3-small", input=["gateway", "demo"]
    )
    said.append(f"embeddings: {len(embedding.data)} vectors")
    said.append(await _realtime(base_url))
    said.append(await _batch(research, app))
    interns = openai.AsyncOpenAI(base_url=base_url, api_key=DEMO_KEYS["interns"], max_retries=0)
    for attempt in range(3):
        try:
            await interns.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"call {attempt}"}]
            )
            said.append(f"interns #{attempt + 1}: ok")
        except openai.RateLimitError as error:
            retry = error.response.headers.get("retry-after")
            said.append(f"interns #{attempt + 1}: 429 {error.code} (retry-after {retry}s)")
    await research.close()
    await interns.close()
    return said


async def _exported(app: web.Application, stripe: FakeBilling) -> str:
    """The billable calls as Stripe meter events, once each (waits up to 5 s for them)."""
    await app[LEDGER].flush()
    (billable,) = (
        await app[LEDGER].reader.tuples(
            "SELECT COUNT(*) FROM requests WHERE status >= 200 AND status < 300"
        )
    )[0]
    for _ in range(50):
        if len(stripe.events("stripe")) >= billable:
            break
        await asyncio.sleep(0.1)
    events = stripe.events("stripe")
    spend = sum(event.value or 0 for event in events)
    return (f"stripe:     {len(events)} meter events for {billable} billable calls, "
            f"{spend} nano-USD (a local fake of Stripe; `export:` in the config)")  # fmt: skip


async def run_demo() -> str:
    os.environ["DEMO_UPSTREAM_KEY"] = os.environ["FAKE_UPSTREAM_KEY"] = UPSTREAM_KEY
    os.environ["DEMO_STRIPE_KEY"] = DEMO_STRIPE_KEY
    with tempfile.TemporaryDirectory(prefix="metering-gateway-demo-") as tmp:
        folder = Path(tmp)
        fake_runner, fake_port = await _start(build_fake_app())
        stripe = FakeBilling(api_keys={"stripe": DEMO_STRIPE_KEY})
        billing_runner, billing_url = await start_fake_billing(stripe)
        config = load_config(_config(folder, fake_port, billing_url))
        app = build_app(config)
        gateway_runner, port = await _start(app)
        try:
            said = await _traffic(f"http://127.0.0.1:{port}/v1", app)
            said.append(await _exported(app, stripe))
            await app[LEDGER].flush()
            rows = await usage_rows(app[LEDGER].reader, ReportQuery())
        finally:
            await gateway_runner.cleanup()
            await billing_runner.cleanup()
            await fake_runner.cleanup()
    return "\n".join(
        [f"gateway on http://127.0.0.1:{port}/v1 -> fake upstream on port {fake_port}", ""]
        + said
        + ["", "report (metering-gateway report):", render(rows, "table")]
    )
