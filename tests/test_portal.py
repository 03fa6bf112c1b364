"""The portal in a real headless Chromium: the numbers it renders equal the ledger's."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import openai
import pytest

from gateway.pricing.arithmetic import format_usd
from tests.conftest import PRODUCT_KEY, RESEARCH_KEY, SOON_EXPIRY, SOON_KEY, Gateway, sha

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
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
HOSTILE_MODEL = '<img src=x onerror="document.title=1">gpt'
DOCS = ROOT / "docs"
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
    soon = gateway.client(SOON_KEY)
    with pytest.raises(openai.InternalServerError):
        await soon.chat.completions.create(**CHAT, extra_headers={"x-fake-fault": "status=500"})
    await soon.chat.completions.create(**{**CHAT, "model": HOSTILE_MODEL})
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


def key_holder_view(url: str, tmp_path: Path, width: int, screenshot: Path) -> dict:
    driver = browser(tmp_path, width, 2400)
    downloads = tmp_path / f"downloads-{width}"
    downloads.mkdir()
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    wait = WebDriverWait(driver, 15)
    try:
        show(driver, url, SOON_KEY, "me")
        calls = "#call-table tbody tr[data-request-id]"
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, calls))
        wait.until(lambda d: d.find_elements(By.ID, "invoice-total"))
        text: dict = {
            name: driver.find_element(By.ID, name).text
            for name in (
                "team", "key-id", "plan", "expires", "total-calls", "total-errors", "total-cost",
                "total-tokens", "spend-today", "renew", "base-url", "invoice-total", "renew-how",
            )
        }  # fmt: skip
        row = driver.find_element(By.CSS_SELECTOR, 'tr[data-limit="requests_per_day"]')
        text["rpd-used"] = row.find_element(By.CLASS_NAME, "used").text
        text["rpd-remaining"] = row.find_element(By.CLASS_NAME, "remaining").text
        text["models"] = {
            r.get_attribute("data-model"): (
                r.find_element(By.CLASS_NAME, "name").text,
                r.find_element(By.CLASS_NAME, "calls").text,
                r.find_element(By.CLASS_NAME, "cost").text,
            )
            for r in driver.find_elements(By.CSS_SELECTOR, "#model-table tbody tr")
        }
        text["calls"] = [
            (r.get_attribute("data-request-id"), r.get_attribute("class"),
             r.find_element(By.CLASS_NAME, "cost").text)
            for r in driver.find_elements(By.CSS_SELECTOR, "#call-table tbody tr")
        ]  # fmt: skip
        text["images"] = len(driver.find_elements(By.TAG_NAME, "img"))
        text["title"] = driver.title
        text["snippet"] = driver.find_element(By.ID, "snippet").text
        text["page-width"] = driver.execute_script("return document.body.scrollWidth")
        driver.save_screenshot(str(screenshot))
        driver.find_element(By.ID, "failed-only").click()  # the keyboard's space works too
        text["failed-only"] = [
            r.get_attribute("data-request-id")
            for r in driver.find_elements(By.CSS_SELECTOR, "#call-table tbody tr")
        ]
        driver.find_element(By.ID, "invoice-csv").click()
        wait.until(lambda d: list(downloads.glob("*.csv")))
        (csv_file,) = downloads.glob("*.csv")
        text["csv-name"] = csv_file.name
        text["csv"] = csv_file.read_text()
        text["console"] = [entry["message"] for entry in driver.get_log("browser")]
        return text
    finally:
        driver.quit()


def admin_view(url: str, tmp_path: Path) -> dict:
    driver = browser(tmp_path, 1280, 2400)
    wait = WebDriverWait(driver, 15)

    def cells(table: str, attribute: str, *names: str) -> dict:
        rows = driver.find_elements(By.CSS_SELECTOR, f"{table} tbody tr")
        return {
            r.get_attribute(attribute): tuple(r.find_element(By.CLASS_NAME, n).text for n in names)
            for r in rows
        }

    try:
        driver.get(url)
        driver.find_element(By.ID, "key").send_keys(ADMIN_KEY + Keys.ENTER)  # the keyboard
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "teams")))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#price-table tbody tr[data-model]"))
        seen: dict = {
            "teams": cells("#team-table", "data-team", "calls", "cost"),
            "models": cells("#admin-model-table", "data-model", "calls", "cost"),
            "prices": cells("#price-table", "data-model", "input", "output"),
        }
        seen["refusals"] = [
            tuple(td.text for td in r.find_elements(By.TAG_NAME, "td"))
            for r in driver.find_elements(By.CSS_SELECTOR, "#refusal-table tbody tr")
        ]
        team = driver.find_element(By.CSS_SELECTOR, '#team-table tr[data-team="research"] button')
        team.send_keys(Keys.ENTER)
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "team-keys")))
        seen["keys"] = cells("#team-key-table", "data-key", "calls", "cost")
        key = driver.find_element(
            By.CSS_SELECTOR, '#team-key-table tr[data-key="research-soon"] button'
        )
        key.click()
        wait.until(lambda d: "research-soon" in d.find_element(By.ID, "calls-scope").text)
        seen["calls"] = [
            r.get_attribute("data-request-id")
            for r in driver.find_elements(By.CSS_SELECTOR, "#call-table tbody tr")
        ]
        return seen
    finally:
        driver.quit()


@pytest.mark.parametrize("width", [390, 1280])
async def test_portal_shows_a_key_holder_exactly_what_the_ledger_says(
    traffic: Gateway, tmp_path: Path, width: int
):
    rows = [r for r in await traffic.rows() if r["key_id"] == "research-soon"]
    # PORTAL_SCREENSHOTS=1 writes the README's pictures (docs/portal-390.png, -1280.png).
    shots = DOCS if os.environ.get("PORTAL_SCREENSHOTS") else tmp_path
    screenshot = shots / f"portal-{width}.png"
    url = str(traffic.server.make_url("/portal/"))
    text = await asyncio.to_thread(key_holder_view, url, tmp_path, width, screenshot)
    assert (text["team"], text["key-id"], text["plan"]) == ("research", "research-soon", "usage")
    assert text["expires"] == f"{SOON_EXPIRY.isoformat()} (3 days left)"
    assert "expires on" in text["renew"] and "renew" in text["renew-how"]
    assert text["total-calls"] == str(len(rows)) == "4"
    assert text["total-errors"] == "1"
    assert text["total-tokens"] == str(sum(r["input_tokens"] + r["output_tokens"] for r in rows))
    assert text["total-cost"] == format_usd(sum(r["cost_nanousd"] for r in rows))
    assert text["spend-today"] == format_usd(sum(r["cost_nanousd"] for r in rows)) + " USD"
    team_calls = sum(1 for r in await traffic.rows() if r["team"] == "research")
    # the team's daily limit is the only one: the key sees the team's count against it
    assert (text["rpd-used"], text["rpd-remaining"]) == (
        str(team_calls),
        f"{100 - team_calls} of 100",
    )
    # Per model, as the ledger sums it; the hostile name is text, never markup.
    expected_models = {}
    for model in {r["model"] for r in rows}:
        mine = [r for r in rows if r["model"] == model]
        cost = format_usd(sum(r["cost_nanousd"] for r in mine))
        expected_models[model] = (model, str(len(mine)), cost)
    assert text["models"] == expected_models
    assert HOSTILE_MODEL in text["models"]
    assert text["images"] == 0 and text["title"] != "1"
    # The latest calls: newest first, each as the ledger has it; the failed one marked.
    newest_first = sorted(rows, key=lambda r: (r["started_at"], r["request_id"]), reverse=True)
    assert [(c[0], c[2]) for c in text["calls"]] == [
        (r["request_id"], format_usd(r["cost_nanousd"])) for r in newest_first
    ]
    failed = [r["request_id"] for r in newest_first if r["outcome"] != "ok"]
    assert [c[0] for c in text["calls"] if "failed" in (c[1] or "")] == failed
    assert text["failed-only"] == failed and len(failed) == 1
    # The invoice: its total and its CSV download are the `invoice` command's.
    month = datetime.now(UTC).strftime("%Y-%m")
    invoice = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", "invoice", "--config", str(traffic_config(traffic)),
         "--team", "research", "--month", month, "--format", "csv"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert text["csv"] == invoice.stdout
    assert text["csv-name"] == f"invoice-research-{month}.csv"
    team_total = sum(r["cost_nanousd"] for r in await traffic.rows() if r["team"] == "research")
    assert text["invoice-total"] == format_usd(team_total)
    # The quick start: this gateway's URL, the key left for the user to paste.
    assert text["base-url"] == url.replace("/portal/", "/v1")
    assert 'api_key="YOUR_GATEWAY_KEY"' in text["snippet"] and SOON_KEY not in text["snippet"]
    assert not [m for m in text["console"] if "Content Security Policy" in m], text["console"]
    assert int(text["page-width"]) <= width
    assert len(await asyncio.to_thread(screenshot.read_bytes)) > 10_000


def traffic_config(gateway: Gateway) -> Path:
    return gateway.ledger_path.parent / "gateway-0.yaml"


async def test_portal_admin_sees_every_team_its_keys_their_calls_refusals_and_prices(
    traffic: Gateway, tmp_path
):
    with pytest.raises(openai.AuthenticationError):
        await traffic.client("mgw-not-a-key").chat.completions.create(**CHAT)
    rows = await traffic.rows()
    url = str(traffic.server.make_url("/portal/"))
    seen = await asyncio.to_thread(admin_view, url, tmp_path)

    def sums(select) -> tuple[str, str]:  # type: ignore[no-untyped-def]
        chosen = [r for r in rows if select(r)]
        return str(len(chosen)), format_usd(sum(r["cost_nanousd"] for r in chosen))

    assert seen["teams"] == {
        "research": sums(lambda r: r["team"] == "research"),
        "product": sums(lambda r: r["team"] == "product"),
        "(unknown key)": sums(lambda r: r["team"] is None),
    }
    assert seen["teams"]["product"][0] == "4"
    assert seen["keys"] == {
        "research-dev": sums(lambda r: r["key_id"] == "research-dev"),
        "research-soon": sums(lambda r: r["key_id"] == "research-soon"),
    }
    assert seen["models"][HOSTILE_MODEL] == sums(lambda r: r["model"] == HOSTILE_MODEL)
    assert seen["models"]["gpt-4o-mini"] == sums(lambda r: r["model"] == "gpt-4o-mini")
    assert seen["refusals"] == [("(unknown key)", "–", "–", "invalid_api_key", "401", "1")]
    soon = sorted((r for r in rows if r["key_id"] == "research-soon"),
                  key=lambda r: (r["started_at"], r["request_id"]), reverse=True)  # fmt: skip
    assert seen["calls"] == [r["request_id"] for r in soon]
    assert seen["prices"]["gpt-4o-mini"] == ("0.15", "0.6")


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
