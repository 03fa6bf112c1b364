"""Percentiles, number formats, text and Markdown tables, and what a report says about where
it was made (commit, command line); the Markdown between a script's markers."""

from __future__ import annotations

import math
import shlex
import subprocess
import sys

from harness import REPO


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, in the values' unit."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "rate":
        return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"
    return f"{value:.3f}"


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A text table on stdout, a blank line before and after it."""
    print()
    print(text_table(headers, rows))
    print()


def print_warnings(notes: list[str]) -> None:
    for note in notes:
        print(f"warning: {note}")


def md_warnings(heading: str, notes: list[str]) -> list[str]:
    """The warnings as a Markdown list under `heading`, after a blank line; none, no lines."""
    return ["", heading, "", *(f"- {note}" for note in notes)] if notes else []


def md_table(headers: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    align = ["---"] * text_columns + ["---:"] * (len(headers) - text_columns)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def git_commit() -> str:
    """HEAD and whether the tree has changes (read-only git commands)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def command_block() -> list[str]:
    """The command line this report came from, as Markdown lines."""
    return ["Command:", "", "```sh", shlex.join([sys.executable, *sys.argv]), "```"]


def between_markers(text: str, begin: str, end: str) -> tuple[str, str] | None:
    """What stands before the begin marker and after the end marker; None without both."""
    if begin in text and end in text:
        return text[: text.index(begin)], text[text.index(end) + len(end) :]
    return None
