"""The README's config reference lists exactly the keys the validator accepts, each with the
type, default and meaning the schema declares."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.config.loader import documented_keys, reference_rows

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION_OF_PREFIX = {
    "": "top",
    "teams.<team>.limits": "limits (team or key)",
}


def reference_section() -> str:
    return README.read_text().split("## Config reference", 1)[1].split("\n## ", 1)[0]


def reference_keys() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in re.findall(r"^\| `([^`]+)` \|", reference_section(), re.MULTILINE):
        parts = path.split(".")
        # `listen.host` also documents `listen` itself, and so on up the path.
        for depth in range(1, len(parts) + 1):
            prefix, key = ".".join(parts[: depth - 1]), parts[depth - 1]
            if not key.startswith("<"):
                section_name = SECTION_OF_PREFIX.get(prefix, prefix)
                found.setdefault(section_name, set()).add(key.removesuffix("[]"))
    return found


def test_config_reference_matches_the_validator():
    documented = reference_keys()
    accepted = documented_keys()
    # the team's `limits` mapping is a section of its own; keys[].limits shares its names
    assert documented.pop("teams.<team>.limits", set()) == set()
    assert documented == accepted


def test_each_reference_row_gives_the_type_default_and_doc_the_schema_declares():
    rows = re.finditer(r"^\| `([^`]+)` \|.*$", reference_section(), re.MULTILINE)
    written = {row.group(1): row.group(0) for row in rows}
    declared = reference_rows()
    assert sorted(written) == sorted(declared)
    for path, row in written.items():
        assert row == declared[path], path


def test_readme_gives_the_two_setup_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    assert "pip install . && OPENAI_API_KEY=sk-... metering-gateway serve" in text
    command = "bash scripts/test.sh && python -m pytest -q"
    assert f"```sh\n{command}\n```" in text
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == command, "CI runs exactly the README's test command"
    script = (README.parent / "scripts" / "test.sh").read_text()
    assert "pip install --quiet '.[test]'" in script
    assert script.rstrip().endswith("ruff check .")
