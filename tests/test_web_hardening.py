"""Walls between teams, on the gateway's own web surface: malformed usage queries are 400s in
OpenAI's shape (never a 500), an expired key reads nothing, the gateway's own answers carry
security headers (proxied answers do not), and the portal shows config and client values as
text under a Content-Security-Policy, in a real headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import EXPIRED_KEY, RESEARCH_KEY, UPSTREAM_KEY, Fake, Gateway, sha

ADMIN_KEY = "mgw-hardening-admin"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello to me"}]}
PORTAL_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


@pytest.fixture(autouse=True)
def _admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", ADMIN_KEY)


async def fetch(
    gateway: Gateway, path: str, key: str | None = None, method: str = "GET", **kwargs
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, str(gateway.server.make_url(path)), headers=headers, allow_redirects=False,
            **kwargs,
        ) as response,
    ):  # fmt: skip
        return response.status, dict(response.headers), await response.read()


def cursor(text: str) -> str:
    """A page token built the way the API builds its own, around any text."""
    return "page_" + base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def short(value: str) -> str:
    return value if len(value) <= 16 else f"{value[:8]}...({len(value)} chars)"


# ---------------------------------------------------------------- malformed query parameters

ENDPOINTS = {
    "/gateway/usage": ADMIN_KEY,
    "/gateway/me/usage": RESEARCH_KEY,
    "/v1/organization/usage/completions": ADMIN_KEY,
    "/v1/organization/costs": ADMIN_KEY,
}
# (query parameter as sent, value, the parameter the 400 names)
BAD_VALUES = [
    ("page", "zzz", "page"),
    ("page", "9" * 4300, "page"),
    ("page", cursor("9" * 4300), "page"),  # past int()'s 4,300-digit limit
    ("page", cursor("9" * 4000), "page"),  # an int, but no float can hold it
    ("page", cursor("0"), "page"),  # a cursor from before start_time
    ("page", cursor("-86400"), "page"),
    ("page", cursor("not a number"), "page"),
    ("end_time", "1e400", "end_time"),
    ("end_time", "9" * 30, "end_time"),
    ("end_time", "0", "end_time"),  # before start_time
    ("start_time", "nan", "start_time"),
    ("start_time", "inf", "start_time"),
    ("start_time", "-1e30", "start_time"),
    ("start_time", "-1" + "0" * 30, "start_time"),
    ("start_time", "99999999999999999999", "start_time"),
    ("start_time", "", "start_time"),
    ("start_time", "1_700_000_000", "start_time"),
    ("limit", "0", "limit"),
    ("limit", "-1", "limit"),
    ("limit", "abc", "limit"),
    ("limit", "99999999999999999999", "limit"),
    ("limit", "100000", "limit"),
    ("bucket_width", "1w", "bucket_width"),
    ("group_by", "zzz", "group_by"),
    ("group_by[]", "zzz", "group_by"),
]


@pytest.fixture
async def gateway(make_gateway) -> Gateway:
    gateway = await make_gateway()
    await gateway.client(RESEARCH_KEY).chat.completions.create(**CHAT)
    await gateway.rows()
    return gateway


@pytest.mark.parametrize("path", list(ENDPOINTS))
@pytest.mark.parametrize(
    ("name", "value", "param"), BAD_VALUES, ids=[f"{n}={short(v)}" for n, v, _ in BAD_VALUES]
)
async def test_every_malformed_usage_query_parameter_is_a_400_naming_it(
    gateway: Gateway, path: str, name: str, value: str, param: str
):
    params = {"start_time": str(int(time.time()) - 3 * 86400), name: value}
    status, headers, body = await fetch(gateway, path, ENDPOINTS[path], params=params)
    assert status == 400, body
    assert headers["Content-Type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert isinstance(error.pop("message"), str)
    assert error == {"type": "invalid_request_error", "param": param, "code": "invalid_request"}


@pytest.mark.parametrize(
    "path", ["/gateway/usage", "/v1/organization/usage/completions", "/v1/organization/costs"]
)
async def test_a_cursor_the_api_returned_still_pages_to_the_last_bucket(gateway: Gateway, path):
    width = 86400 if path == "/v1/organization/costs" else 3600
    end = int(time.time()) // width * width + width
    params = {"start_time": end - 4 * width, "end_time": end, "limit": 2,
              "bucket_width": "1d" if width == 86400 else "1h"}  # fmt: skip
    status, _, first = await fetch(gateway, path, ADMIN_KEY, params=params)
    assert status == 200, first
    page = json.loads(first)["next_page"]
    status, _, second = await fetch(gateway, path, ADMIN_KEY, params={**params, "page": page})
    assert status == 200, second
    starts = [bucket["start_time"] for bucket in json.loads(second)["data"]]
    assert starts == [end - 2 * width, end - width]
    assert json.loads(second)["has_more"] is False


# ---------------------------------------------------------------- expired keys


@pytest.mark.parametrize("path", ["/gateway/me", "/gateway/me/usage"])
async def test_an_expired_key_reads_nothing_of_its_own(gateway: Gateway, path: str):
    params = {"start_time": str(int(time.time()) - 86400)}
    status, _, body = await fetch(gateway, path, EXPIRED_KEY, params=params)
    assert status == 401
    assert json.loads(body) == {
        "error": {
            "message": "This gateway key expired on 2020-01-31. Ask for a new key.",
            "type": "invalid_request_error",
            "param": None,
            "code": "key_expired",
        }
    }


# ---------------------------------------------------------------- security headers

OWN_ANSWERS = [
    ("/portal/", None, 200),
    ("/portal/portal.js", None, 200),
    ("/portal/portal.css", None, 200),
    ("/portal", None, 302),
    ("/portal/missing.js", None, 404),
    ("/gateway/me", RESEARCH_KEY, 200),
    ("/gateway/me", None, 401),
    ("/gateway/me/usage?start_time=0", RESEARCH_KEY, 200),
    ("/gateway/usage?start_time=0", ADMIN_KEY, 200),
    ("/gateway/usage?start_time=0", None, 401),
    ("/v1/organization/usage/completions?start_time=0", ADMIN_KEY, 200),
    ("/v1/organization/usage/completions?start_time=zzz", ADMIN_KEY, 400),
    ("/v1/organization/costs?start_time=0", ADMIN_KEY, 200),
    ("/metrics", None, 200),
    ("/healthz", None, 200),
    ("/readyz", None, 200),
    ("/nowhere", None, 404),
]


@pytest.mark.parametrize(("path", "key", "expected_status"), OWN_ANSWERS)
async def test_the_gateways_own_answers_carry_nosniff_and_no_store(
    gateway: Gateway, path: str, key: str | None, expected_status: int
):
    status, headers, _ = await fetch(gateway, path, key)
    assert status == expected_status
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-store"
    if path.startswith("/portal"):
        assert headers["Content-Security-Policy"] == PORTAL_CSP
    else:
        assert "Content-Security-Policy" not in headers


def test_the_portal_page_has_no_inline_script_or_style():
    root = Path(__file__).resolve().parent.parent / "gateway" / "web" / "static"
    html = (root / "index.html").read_text()
    script = (root / "portal.js").read_text()
    assert re.findall(r"<style|\sstyle=|<script>|\son[a-z]+=", html) == []
    assert re.findall(r"\.innerHTML\s*=|insertAdjacentHTML|outerHTML|document\.write", script) == []
    assert "style=" not in script


async def test_proxied_answers_are_relayed_without_the_gateways_headers(
    gateway: Gateway, fake: Fake
):
    calls = (("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/models", None))
    direct = {}
    async with aiohttp.ClientSession() as http:
        for method, path, body in calls:
            url = fake.base_url + path.removeprefix("/v1")
            auth = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
            async with http.request(method, url, json=body, headers=auth) as response:
                assert response.status == 200
                direct[path] = dict(response.headers)
    for method, path, body in calls:
        status, headers, _ = await fetch(gateway, path, RESEARCH_KEY, method=method, json=body)
        assert status == 200
        for name in ("X-Content-Type-Options", "Cache-Control", "Content-Security-Policy"):
            assert headers.get(name) == direct[path].get(name)
    stream = {**CHAT, "stream": True}
    status, headers, _ = await fetch(gateway, "/v1/chat/completions", RESEARCH_KEY, "POST",
                                     json=stream)  # fmt: skip
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert "X-Content-Type-Options" not in headers and "Content-Security-Policy" not in headers


# ---------------------------------------------------------------- the portal, in a browser

XSS_TEAM = '<img src=x onerror="window.__xss=1">'
XSS_KEY_ID = '<svg onload="window.__xss=2">k\'1'
XSS_KEY = "mgw-test-xss-secret"
XSS_TEAMS = f"""
  research:
    keys:
      - id: research-dev
        sha256: {sha(RESEARCH_KEY)}
  '{XSS_TEAM}':
    limits: {{requests_per_day: 40}}
    keys:
      - id: '{XSS_KEY_ID.replace("'", "''")}'
        sha256: {sha(XSS_KEY)}
"""
VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


def portal_views(url: str, tmp_path: Path) -> dict[str, object]:
    from selenium.webdriver.common.by import By

    from tests.test_portal import ADMIN_KEY as PORTAL_ADMIN_KEY
    from tests.test_portal import browser, show

    driver = browser(tmp_path, 1200, 1000)
    seen: dict[str, object] = {}
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": VIOLATIONS})
        show(driver, url, PORTAL_ADMIN_KEY, "teams")
        rows = driver.find_elements(By.CSS_SELECTOR, "#team-table tbody tr")
        seen["admin_rows"] = [
            (row.get_attribute("data-team"), row.find_element(By.TAG_NAME, "td").text,
             row.find_element(By.CLASS_NAME, "calls").text)
            for row in rows
        ]  # fmt: skip
        seen["admin_images"] = len(driver.find_elements(By.CSS_SELECTOR, "#team-table img"))
        seen["admin_bars"] = len(driver.find_elements(By.CSS_SELECTOR, "#chart-calls svg rect"))
        seen["admin_days"] = len(driver.find_elements(By.CSS_SELECTOR, "#chart-calls svg text"))
        seen["admin_xss"] = driver.execute_script("return window.__xss ?? null")
        seen["admin_violations"] = driver.execute_script("return window.__violations")
        driver.delete_all_cookies()
        driver.execute_script("sessionStorage.clear()")
        show(driver, url, XSS_KEY, "me")
        seen["team"] = driver.find_element(By.ID, "team").text
        seen["key_id"] = driver.find_element(By.ID, "key-id").text
        seen["status"] = driver.find_element(By.ID, "status").text
        seen["me_markup"] = len(driver.find_elements(By.CSS_SELECTOR, "#me img, #me svg"))
        bar = driver.find_element(By.CSS_SELECTOR, 'tr[data-limit="requests_per_day"] .bar span')
        seen["bar_width"] = bar.get_attribute("style")
        seen["bar_pixels"] = bar.size["width"]
        seen["me_xss"] = driver.execute_script("return window.__xss ?? null")
        seen["me_violations"] = driver.execute_script("return window.__violations")
        seen["console"] = [entry["message"] for entry in driver.get_log("browser")]
    finally:
        driver.quit()
    return seen


async def test_portal_shows_hostile_team_and_key_names_as_text_under_its_csp(
    make_gateway, monkeypatch, tmp_path: Path
):
    pytest.importorskip("selenium.webdriver")
    from tests.test_portal import ADMIN_KEY as PORTAL_ADMIN_KEY
    from tests.test_portal import CHROMEDRIVER, CHROMIUM

    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian chromium and chromium-driver are needed")
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", PORTAL_ADMIN_KEY)
    gateway = await make_gateway(teams=XSS_TEAMS)
    assert XSS_TEAM in gateway.config.teams  # the config accepts the name as it is
    hostile = gateway.client(XSS_KEY)
    for _ in range(4):
        await hostile.chat.completions.create(**CHAT)
    await gateway.client(RESEARCH_KEY).chat.completions.create(**CHAT)
    await gateway.rows()

    status, headers, _ = await fetch(gateway, "/portal/")
    assert status == 200
    assert headers["Content-Security-Policy"] == PORTAL_CSP
    assert headers["X-Content-Type-Options"] == "nosniff"

    seen = await asyncio.to_thread(portal_views, str(gateway.server.make_url("/portal/")), tmp_path)
    assert seen["admin_rows"] == [(XSS_TEAM, XSS_TEAM, "4"), ("research", "research", "1")]
    assert seen["admin_images"] == 0
    # The page's script ran: one bar for the one day with calls (none errors), and the axis:
    # three y ticks and three dates of the 14 days.
    assert (seen["admin_bars"], seen["admin_days"]) == (1, 6)
    assert seen["admin_xss"] is None and seen["me_xss"] is None
    assert (seen["team"], seen["key_id"]) == (XSS_TEAM, XSS_KEY_ID)
    assert seen["status"] == f"Usage of key {XSS_KEY_ID}."
    assert seen["me_markup"] == 0
    assert seen["bar_width"] == "width: 10%;"  # 4 of 40, set through the CSSOM, CSP allows it
    assert seen["bar_pixels"] > 0
    assert seen["admin_violations"] == [] and seen["me_violations"] == []
    assert [line for line in seen["console"] if "Content Security Policy" in line] == []
