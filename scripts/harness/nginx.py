"""Debian's nginx and wrk beside the stack: installed with apt-get where missing (as root, or
through `sudo -n`), and nginx run from a config template (`scripts/nginx/*.conf.template`) in a
folder of the temp dir, in the foreground, so that it is stopped, pinned and accounted like the
other processes (`process` is its master; `harness.stack.Stack.services` takes it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from harness.machine import stop_process, wait_for_port
from harness.runtime import BenchError, progress, tail

APT_TIMEOUT_S = 600.0
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")  # nginx's home, not on every user's PATH

# While apt-get runs, a policy-rc.d that says 101 ("action forbidden") keeps the nginx
# package's postinst from starting the system's nginx on port 80 (a container often has one).
_APT_SCRIPT = """\
set -e
made=
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made=1
fi
cleanup() { if [ -n "$made" ]; then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
"""


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found is not None:
        return found
    for folder in SBIN:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def apt_install(packages: list[str]) -> None:
    """`apt-get install` the Debian packages, as root or through `sudo -n` (no prompt)."""
    if os.geteuid() == 0:
        as_root: list[str] = []
    elif shutil.which("sudo") is not None:
        as_root = ["sudo", "-n"]
    else:
        raise BenchError(
            f"needs Debian packages {' '.join(packages)}: install them as root "
            f"(apt-get install {' '.join(packages)}), then run this again"
        )
    if shutil.which("apt-get") is None:
        raise BenchError(f"needs {' '.join(packages)} and there is no apt-get to install them")
    progress(f"installing {' '.join(packages)} with apt-get")
    try:
        done = subprocess.run(
            [*as_root, "sh", "-c", _APT_SCRIPT, "apt-install", *packages],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=APT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"apt-get install {' '.join(packages)}: no end after 600 s") from exc
    if done.returncode != 0:
        raise BenchError(
            f"apt-get install {' '.join(packages)} failed ({done.returncode}): "
            f"{(done.stdout + done.stderr)[-1500:]}"
        )


def ensure_binaries(wanted: dict[str, str], install: bool = True) -> dict[str, str]:
    """The path of each binary in `wanted` (binary name → the Debian package that has it),
    installing the packages of those missing unless `install` is false."""
    missing = sorted({package for name, package in wanted.items() if find_binary(name) is None})
    if missing:
        if not install:
            raise BenchError(f"missing {' '.join(missing)} (and --no-install was given)")
        apt_install(missing)
    paths = {name: find_binary(name) for name in wanted}
    absent = [name for name, path in paths.items() if path is None]
    if absent:
        raise BenchError(f"{' '.join(absent)} still not found after apt-get install")
    return {name: path for name, path in paths.items() if path is not None}


def nginx_version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    text = (done.stderr + done.stdout).strip()
    return text.removeprefix("nginx version: ") or "unknown"


def render(template: str, values: dict[str, str]) -> str:
    """The template with each `@NAME@` replaced (nginx configs use `$` and braces themselves)."""
    text = template
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    if left := sorted(set(re.findall(r"@[A-Z][A-Z0-9_]*@", text))):
        raise BenchError(f"nginx template: no value for {', '.join(left)}")
    return text


class NginxServer:
    """One nginx from a template, in `prefix` (its config, pid file, logs, temp folders and any
    files it serves), listening on 127.0.0.1:`port`; one worker process."""

    def __init__(
        self, binary: str, template: Path, prefix: Path, port: int, values: dict[str, str]
    ) -> None:
        self.binary = binary
        self.template = template
        self.prefix = prefix
        self.port = port
        self.values = values
        self.config = prefix / "nginx.conf"
        self.log = prefix / "error.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise BenchError(f"nginx in {self.prefix} was not started")
        return self._process

    def write_config(self) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        for folder in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.prefix / "temp" / folder).mkdir(parents=True, exist_ok=True)
        values = {
            "PREFIX": str(self.prefix),
            "PORT": str(self.port),
            # Workers would drop to `nobody`, who cannot enter the temp dir (mode 0700).
            "USER": "user root;" if os.geteuid() == 0 else "",
            **self.values,
        }
        self.config.write_text(render(self.template.read_text(), values))

    def start(self) -> None:
        self.write_config()
        base = [self.binary, "-p", str(self.prefix), "-e", str(self.log), "-c", str(self.config)]
        check = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise BenchError(f"nginx -t {self.config}: {check.stderr.strip()[-1500:]}")
        out = (self.prefix / "stdout.log").open("wb")
        with out:
            self._process = subprocess.Popen(
                [*base, "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, self._process, self.log)

    def check_alive(self) -> None:
        if self._process is None or self._process.poll() is not None:
            raise BenchError(f"nginx in {self.prefix} is not running: {tail(self.log)}")

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process, 10)  # SIGTERM: nginx's fast shutdown
