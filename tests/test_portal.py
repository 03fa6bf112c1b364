"""The portal in a real headless Chromium: the numbers it renders equal the ledger's."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import openai
import pytest

from gateway.pricing.arithmetic import format_usd
from tests.conftest import PRODUCT_KEY, RESEARCH_KEY, SOON_EXPIRY, SOON_KEY, Gateway, sha

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="Debian chromium and chromium-driver are needed"
)
ADMIN_KEY = "mgw-portal-admin"
ROOT = Path(__file__).resolve().parent.parent
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello to me"}]}
TEAMS = f"""
  research:
    limits: {{requests_per_day: 100, spend_per_day_usd: 1}}
    keys:
      - id: research-dev
        sha256: {sha(RESEARCH_KEY)}
      - id: research-soon
        sha256: {sha(SOON_KEY)}
        expires: {SOON_EXPIRY.isoformat()}
  product:
    keys:
      - id: product-web
        sha256: {sha(PRODUCT_KEY)}
"""


@pytest.fixture
async def traffic(make_gateway, monkeypatch) -> Gateway:
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", ADMIN_KEY)
    gateway = await make_gateway(teams=TEAMS)
    for key, calls in ((RESEARCH_KEY, 4), (SOON_KEY, 2), (PRODUCT_KEY, 3)):
        client = gateway.client(key)
        for _ in range(calls):
            await client.chat.completions.create(**CHAT)
    with pytest.raises(openai.InternalServerError):
        await gateway.client(PRODUCT_KEY).chat.completions.create(
            **CHAT, extra_headers={"x-fake-fault": "status=500"}
        )
    await gateway.rows()
    return gateway


def browser(tmp_path: Path, width: int, height: int):  # type: ignore[no-untyped-def]
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chrome'}",
        f"--window-size={width},{height}",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console, for CSP checks
    if width < 500:  # below headless Chromium's smallest window: emulate the phone instead
        options.add_experimental_option(
            "mobileEmulation",
            {"deviceMetrics": {"width": width, "height": height, "pixelRatio": 2}},
        )
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    return webdriver.Chrome(options=options, service=service)


def show(driver, url: str, key: str, ready_id: str) -> None:  # type: ignore[no-untyped-def]
    driver.get(url)
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "show").click()
    WebDriverWait(driver, 15).until(expected_conditions.visibility_of_element_located(
        (By.ID, ready_id)))  # fmt: skip
    WebDriverWait(driver, 15).until(
        lambda d: d.find_element(By.ID, "total-calls").text.strip() != ""
    )


def key_holder_view(url: str, tmp_path: Path, screenshot: Path) -> dict[str, str]:
    driver = browser(tmp_path, 390, 1400)  # a phone-width screen
    try:
        show(driver, url, SOON_KEY, "me")
        text = {
            name: driver.find_element(By.ID, name).text
            for name in (
                "team",
                "key-id",
                "plan",
                "expires",
                "total-calls",
                "total-cost",
                "total-tokens",
                "spend-today",
                "renew",
            )  # fmt: skip
        }
        row = driver.find_element(By.CSS_SELECTOR, 'tr[data-limit="requests_per_day"]')
        text["rpd-used"] = row.find_element(By.CLASS_NAME, "used").text
        text["rpd-remaining"] = row.find_element(By.CLASS_NAME, "remaining").text
        text["page-width"] = str(driver.execute_script("return document.body.scrollWidth"))
        driver.save_screenshot(str(screenshot))
        return text
    finally:
        driver.quit()


def admin_view(url: str, tmp_path: Path) -> dict[str, tuple[str, str]]:
    driver = browser(tmp_path, 1200, 1000)
    try:
        show(driver, url, ADMIN_KEY, "teams")
        return {
            row.get_attribute("data-team"): (
                row.find_element(By.CLASS_NAME, "calls").text,
                row.find_element(By.CLASS_NAME, "cost").text,
            )
            for row in driver.find_elements(By.CSS_SELECTOR, "#team-table tbody tr")
        }
    finally:
        driver.quit()


async def test_portal_shows_a_key_holder_exactly_what_the_ledger_says(traffic: Gateway, tmp_path):
    rows = [r for r in await traffic.rows() if r["key_id"] == "research-soon"]
    screenshot = Path(os.environ.get("PORTAL_SCREENSHOT", tmp_path / "portal.png"))
    url = str(traffic.server.make_url("/portal/"))
    text = await asyncio.to_thread(key_holder_view, url, tmp_path, screenshot)
    assert (text["team"], text["key-id"], text["plan"]) == ("research", "research-soon", "usage")
    assert text["expires"] == f"{SOON_EXPIRY.isoformat()} (3 days left)"
    assert "expires on" in text["renew"]
    assert text["total-calls"] == str(len(rows)) == "2"
    assert text["total-tokens"] == str(sum(r["input_tokens"] + r["output_tokens"] for r in rows))
    assert text["total-cost"] == format_usd(sum(r["cost_nanousd"] for r in rows))
    assert text["spend-today"] == format_usd(sum(r["cost_nanousd"] for r in rows)) + " USD"
    team_calls = sum(1 for r in await traffic.rows() if r["team"] == "research")
    # the team's daily limit is the only one: the key sees the team's count against it
    assert (text["rpd-used"], text["rpd-remaining"]) == (
        str(team_calls),
        f"{100 - team_calls} of 100",
    )
    assert int(text["page-width"]) <= 390
    assert len(await asyncio.to_thread(screenshot.read_bytes)) > 10_000


async def test_portal_admin_sees_every_team_side_by_side(traffic: Gateway, tmp_path):
    rows = await traffic.rows()
    url = str(traffic.server.make_url("/portal/"))
    teams = await asyncio.to_thread(admin_view, url, tmp_path)
    expected = {
        team: (
            str(sum(1 for r in rows if r["team"] == team)),
            format_usd(sum(r["cost_nanousd"] for r in rows if r["team"] == team)),
        )
        for team in ("research", "product")
    }
    assert teams == expected
    assert teams["product"][0] == "4"


async def test_portal_refuses_an_unknown_key(traffic: Gateway, tmp_path):
    def attempt() -> str:
        driver = browser(tmp_path, 800, 600)
        try:
            driver.get(str(traffic.server.make_url("/portal/")))
            driver.find_element(By.ID, "key").send_keys("mgw-nobody")
            driver.find_element(By.ID, "show").click()
            WebDriverWait(driver, 15).until(
                lambda d: "error" in d.find_element(By.ID, "status").get_attribute("class")
            )
            assert not driver.find_element(By.ID, "me").is_displayed()
            return driver.find_element(By.ID, "status").text
        finally:
            driver.quit()

    assert await asyncio.to_thread(attempt) == "Incorrect API key provided."


def manage_keys(url: str, tmp_path: Path) -> dict[str, object]:
    """As the admin: issue a key for research, renew it, then revoke it (two clicks)."""
    driver = browser(tmp_path, 1200, 1200)
    wait = WebDriverWait(driver, 15)
    seen: dict[str, object] = {}
    try:
        show(driver, url, ADMIN_KEY, "keys")
        rows = driver.find_elements(By.CSS_SELECTOR, "#key-table tbody tr")
        seen["listed"] = [row.get_attribute("data-key") for row in rows]
        driver.find_element(By.CSS_SELECTOR, '#issue-team option[value="research"]').click()
        driver.find_element(By.ID, "issue-id").send_keys("from-portal")
        driver.find_element(By.ID, "issue-expires").send_keys("30d")
        driver.find_element(By.ID, "issue-button").click()
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "issued")))
        seen["secret"] = driver.find_element(By.ID, "issued-secret").text
        row = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'tr[data-key="from-portal"]'))
        seen["expires"] = row.find_element(By.CLASS_NAME, "expires").text
        row.find_element(By.CLASS_NAME, "renew").click()
        wait.until(lambda d: "now expires" in d.find_element(By.ID, "status").text)
        row = driver.find_element(By.CSS_SELECTOR, 'tr[data-key="from-portal"]')
        seen["renewed"] = row.find_element(By.CLASS_NAME, "expires").text
        revoke = row.find_element(By.CLASS_NAME, "revoke")
        revoke.click()
        seen["confirm_label"] = revoke.text
        revoke.click()
        wait.until(lambda d: "is revoked" in d.find_element(By.ID, "status").text)
        row = driver.find_element(By.CSS_SELECTOR, 'tr[data-key="from-portal"]')
        seen["revoked_at"] = row.find_element(By.CLASS_NAME, "revoked").text
        return seen
    finally:
        driver.quit()


async def test_the_admin_issues_renews_and_revokes_a_key_in_the_portal(traffic: Gateway, tmp_path):
    from datetime import date, timedelta

    url = str(traffic.server.make_url("/portal/"))
    seen = await asyncio.to_thread(manage_keys, url, tmp_path)
    assert seen["listed"] == ["product-web", "research-dev", "research-soon"]
    assert seen["expires"] == (date.today() + timedelta(days=30)).isoformat()
    assert seen["renewed"] == (date.today() + timedelta(days=90)).isoformat()
    assert seen["confirm_label"] == "Confirm revoke" and seen["revoked_at"].endswith("Z")
    secret = str(seen["secret"])
    assert secret.startswith("mgw-")
    with pytest.raises(openai.AuthenticationError) as refused:
        await traffic.client(secret).chat.completions.create(**CHAT)
    assert refused.value.code == "key_revoked"
    row = await traffic.row(refused.value.response.headers["x-gateway-request-id"])
    assert (row["status"], row["error_code"]) == (401, "key_revoked")
    assert (row["team"], row["key_id"]) == ("research", "from-portal")
