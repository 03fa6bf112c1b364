"""Real OpenAI answers (/work/shared/replay) relayed through the gateway byte for byte and
metered to the token, as recorded and reframed: SSE events ended by CRLF blank lines, JSON
re-spaced, every answer written by the upstream in one write."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import RESEARCH_KEY, sha
from tests.raw_upstream import RawUpstream

REPLAY = Path("/work/shared/replay")
MANIFEST = json.loads((REPLAY / "manifest.json").read_text())
RECORDED = [entry for entry in MANIFEST if entry["status"] == 200]
TEAM = f"""
  research:
    keys: [{{id: research-dev, sha256: {sha(RESEARCH_KEY)}}}]
"""
TOKEN_COLUMNS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")


def reframed(body: str, content_type: str, framing: str) -> str:
    if framing == "crlf" and content_type.startswith("text/event-stream"):
        return body.replace("\r\n", "\n").replace("\n", "\r\n")
    if framing == "spaced" and content_type.startswith("application/json"):
        return json.dumps(json.loads(body), indent=2, sort_keys=True)
    return body


def request_body(recording: dict) -> bytes:
    request = recording["request"]
    if request["body_text"] is not None:
        return request["body_text"].encode()
    return json.dumps(request["json"]).encode()


@pytest.fixture
async def canned() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream()
    await upstream.start()
    yield upstream
    await upstream.close()


@pytest.mark.parametrize("framing", ["as recorded", "crlf", "spaced"])
async def test_every_recorded_answer_relays_byte_for_byte_and_meters_to_the_token(
    make_gateway, canned: RawUpstream, framing: str
) -> None:
    gateway = await make_gateway(teams=TEAM, upstream_url=canned.base_url, pricing=None)
    url = str(gateway.server.make_url("/"))
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        for entry in RECORDED:
            recording = json.loads((REPLAY / f"{entry['id']}.json").read_text())
            answer = recording["response"]
            content_type = answer["headers"]["content-type"]
            body = reframed(answer["body_text"], content_type, framing).encode()
            canned.answers.append((content_type, body))
            async with http.post(
                url + entry["endpoint"].lstrip("/"),
                data=request_body(recording),
                headers={"Authorization": f"Bearer {RESEARCH_KEY}",
                         "Content-Type": "application/json"},
            ) as response:  # fmt: skip
                received = await response.read()
                request_id = response.headers["x-gateway-request-id"]
            assert (entry["id"], response.status, received) == (entry["id"], 200, body)
            row = await gateway.row(request_id)
            if entry["usage"] is not None:
                counted = {name: row[name] for name in TOKEN_COLUMNS}
                assert (entry["id"], counted) == (entry["id"], entry["usage"])
                assert row["tokens_estimated"] == 0
    assert len(canned.requests) == len(RECORDED)
