"""The `keys` commands on the ledger's database, next to a running `serve` process: a key
issued, renewed, rotated or revoked offline is in force in the gateway within 2 s, and a
restart keeps it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai

from tests import processes


def keys(stack: processes.Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "keys", *args, "--config", str(stack.config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=stack.env,
    )


def status_of(stack: processes.Stack, secret: str) -> int:
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=secret, max_retries=0
    )
    try:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c"}]
        )
    except openai.APIStatusError as error:
        return error.status_code
    finally:
        client.close()
    return 200


def within_2_s(stack: processes.Stack, secret: str, status: int) -> float:
    started = time.monotonic()
    while (seen := status_of(stack, secret)) != status:
        assert time.monotonic() - started < 2.0, f"still {seen}, not {status}, after 2 s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_keys_issued_and_revoked_offline_reach_the_running_gateway(tmp_path: Path) -> None:
    stack = processes.Stack(tmp_path, processes.TEAMS.replace("{requests_per_day: 20}", "{}"))
    try:
        issued = keys(stack, "new", "--store", "--team", "research", "--id", "cli-1")
        assert issued.returncode == 0, issued.stderr
        secret = issued.stdout.splitlines()[0]
        assert secret.startswith("mgw-") and "cli-1" in issued.stderr
        within_2_s(stack, secret, 200)

        listed = keys(stack, "list", "--format", "json")
        assert listed.returncode == 0
        assert [(k["id"], k["source"]) for k in json.loads(listed.stdout)["data"]] == [
            ("research-dev", "config"), ("cli-1", "api"),
        ]  # fmt: skip
        table = keys(stack, "list", "--team", "research")
        assert "cli-1" in table.stdout and "research-dev" in table.stdout

        renewed = keys(stack, "renew", "cli-1", "--expires", "2099-01-31")
        assert (renewed.returncode, renewed.stdout.strip()) == (0, "cli-1: expires 2099-01-31")

        rotated = keys(stack, "rotate", "cli-1", "--grace", "1h")
        assert rotated.returncode == 0, rotated.stderr
        new_secret = rotated.stdout.splitlines()[0]
        within_2_s(stack, new_secret, 200)
        assert status_of(stack, secret) == 200  # in its hour of grace

        revoked = keys(stack, "revoke", "cli-1")
        assert revoked.returncode == 0
        within_2_s(stack, new_secret, 401)
        assert status_of(stack, secret) == 401  # revoking ends the grace

        stack.gateway.terminate()
        stack.gateway.wait(timeout=30)
        stack.restart_gateway()
        assert status_of(stack, new_secret) == 401
        assert status_of(stack, processes.KEY) == 200
    finally:
        stack.stop()


def test_the_commands_refuse_unknown_and_config_keys(tmp_path: Path) -> None:
    stack = processes.Stack(tmp_path)
    try:
        for args, message in [
            (("revoke", "nobody"), "No key 'nobody'."),
            (("renew", "research-dev", "--expires", "30d"), "is in the config file"),
            (("rotate", "research-dev"), "is in the config file"),
            (("new", "--store", "--team", "nobody"), "No team 'nobody'"),
            (("new", "--store", "--team", "research", "--id", "research-dev"), "config key"),
            (("renew", "x", "--expires", "2001-01-01"), "No key 'x'."),
        ]:
            done = keys(stack, *args)
            assert done.returncode == 1, (args, done.stdout, done.stderr)
            assert message in done.stderr, (args, done.stderr)
        bad_grace = keys(stack, "rotate", "x", "--grace", "soon")
        assert bad_grace.returncode == 2
    finally:
        stack.stop()


def test_a_reload_giving_a_config_key_an_api_keys_id_is_refused(tmp_path: Path) -> None:
    stack = processes.Stack(tmp_path)
    try:
        issued = keys(stack, "new", "--store", "--team", "research", "--id", "taken")
        secret = issued.stdout.splitlines()[0]
        within_2_s(stack, secret, 200)
        clash = f"      - id: taken\n        sha256: {processes.sha('another-secret')}\n"
        stack.write_config(processes.TEAMS + clash)
        stack.gateway.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "config not reloaded" not in stack.log_text():
            assert time.monotonic() < deadline, stack.log_text()
            time.sleep(0.05)
        written = stack.config.read_text().splitlines()
        line = next(n for n, text in enumerate(written, 1) if text.strip() == "- id: taken")
        assert (
            f"config not reloaded: {stack.config}:{line}: key id 'taken' is held by a key "
            "issued over the admin API" in stack.log_text()
        )
        assert status_of(stack, secret) == 200  # the API key still works
    finally:
        stack.stop()
