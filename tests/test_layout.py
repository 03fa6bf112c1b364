"""The package's layout is its architecture: folders by concern, each saying what it is for,
a short top level, and development tools the serving path never loads."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"
CONCERNS = {"access", "batches", "billing", "commands", "config", "devtools", "export", "front",
            "ledger", "limits", "metering", "notify", "pipeline", "pricing", "sessions", "upstream",
            "web"}  # fmt: skip


def test_each_folder_says_in_one_line_what_it_is_for() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == CONCERNS
    for name in sorted(folders):
        docstring = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert docstring and "\n" not in docstring.strip(), name


def test_the_top_level_is_at_most_twelve_modules() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top


def test_serving_never_imports_the_development_tools() -> None:
    probe = (
        "import json, sys; import gateway.server, gateway.app, gateway.cli; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('gateway.devtools'))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=PACKAGE.parent, capture_output=True,
                          text=True, timeout=60, check=True)  # fmt: skip
    assert json.loads(done.stdout) == []


async def test_a_resource_that_fails_to_start_still_closes_the_ones_before_it(
    tmp_path: Path,
) -> None:
    from gateway.app import LEDGER, LIMITER, OBJECTS, READY, UPSTREAM, build_app
    from gateway.config.loader import parse_config
    from gateway.front.server import make_runner

    config = parse_config(
        f"storage: {{sqlite_path: {tmp_path / 'ledger.sqlite3'}}}\nteams: {{}}\n",
        tmp_path / "gateway.yaml",
    )
    app = build_app(config)
    closed: list[str] = []
    for name, key in (("ledger", LEDGER), ("objects", OBJECTS), ("limiter", LIMITER),
                      ("upstream", UPSTREAM)):  # fmt: skip
        resource = app[key]

        async def close(resource=resource, name=name, original=resource.close) -> None:
            closed.append(name)
            await original()

        resource.close = close  # type: ignore[method-assign]

    async def refuse_to_start() -> None:
        assert app[LEDGER].writable
        raise OSError("no upstream today")

    app[UPSTREAM].start = refuse_to_start  # type: ignore[method-assign]
    runner = make_runner(app, 75.0)
    with pytest.raises(OSError, match="no upstream today"):
        await runner.setup()
    await runner.cleanup()
    assert closed == ["limiter", "objects", "ledger"], "started ones closed, in reverse"
    assert app[LEDGER].writable is False
    assert not app[READY].is_set()
