"""Real Redis and PostgreSQL servers for the scale-out tests: Debian's packages, started on
127.0.0.1 with a temporary data dir, stopped when the test session ends.

`.ci/run` installs the packages when they are missing; a machine without them fails these
tests with the package to install, rather than skipping them quietly.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.processes import free_port, stop_process, wait_for_port


def _binary(name: str, package: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise RuntimeError(f"{name} not found: install Debian's '{package}' package")
    return found[-1]


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    directory: Path
    log: Path

    def stop(self) -> None:
        stop_process(self.process, timeout=20)

    def kill(self) -> None:
        """An outage: the server dies at once, without saving anything."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class RedisServer(Server):
    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, directory: Path, port: int | None = None, *options: str) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: install Debian's 'redis-server' package")
        directory.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        log = directory / "redis.log"
        with log.open("a") as output:
            process = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                 "--save", "", "--appendonly", "no", "--protected-mode", "no", *options],
                stdout=output, stderr=output,
            )  # fmt: skip
        wait_for_port(port, process, log, timeout=30)
        return cls(process, port, directory, log)

    def restart(self) -> RedisServer:
        """Killed and started again on the same port, empty (nothing is saved)."""
        self.kill()
        self.process = RedisServer.start(self.directory, self.port).process
        return self


class PostgresServer(Server):
    user = "gateway"
    database = "gateway"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    @classmethod
    def start(cls) -> PostgresServer:
        initdb = _binary("initdb", "postgresql")
        directory = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        run_as = _unprivileged(directory)
        subprocess.run(
            [*run_as, initdb, "-D", str(directory / "data"), "-U", cls.user, "--auth=trust",
             "--encoding=UTF8", "--no-sync"],
            check=True, capture_output=True,
        )  # fmt: skip
        port = free_port()
        log = directory / "postgres.log"
        server = cls(cls._launch(directory, port, log), port, directory, log)
        server._create_database()
        return server

    @classmethod
    def _launch(cls, directory: Path, port: int, log: Path) -> subprocess.Popen:
        postgres = _binary("postgres", "postgresql")
        with log.open("a") as output:
            process = subprocess.Popen(
                [*_unprivileged(directory), postgres, "-D", str(directory / "data"),
                 "-p", str(port), "-h", "127.0.0.1", "-k", str(directory), "-c", "fsync=off",
                 "-c", "full_page_writes=off"],
                stdout=output, stderr=output,
            )  # fmt: skip
        wait_for_port(port, process, log, timeout=30)
        return process

    def kill(self) -> None:
        """An outage: every server process quits at once, nothing checkpointed (crash
        recovery runs at the next start). A SIGKILL would reach only `runuser` when run as
        root, or leave the postmaster's children serving."""
        if self.process.poll() is None:
            self._pg_ctl_stop("immediate")

    def restart(self) -> PostgresServer:
        """After `kill`: a new server on the same data dir and port."""
        self.kill()
        self.process = self._launch(self.directory, self.port, self.log)
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + 30
        while True:  # the port opens before crash recovery ends
            done = subprocess.run(
                ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                 "-d", self.database, "-c", "SELECT 1"],
                capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(done.stderr)
            time.sleep(0.05)

    def _pg_ctl_stop(self, mode: str) -> None:
        pg_ctl = _binary("pg_ctl", "postgresql")
        subprocess.run(
            [*_unprivileged(self.directory), pg_ctl, "stop", "-D", str(self.directory / "data"),
             "-m", mode, "-w"],
            capture_output=True, timeout=60,
        )  # fmt: skip
        self.process.wait(timeout=20)

    def _create_database(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            done = subprocess.run(
                ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                 "-d", "postgres", "-c", f"CREATE DATABASE {self.database}"],
                capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode == 0 or "already exists" in done.stderr:
                return
            if time.monotonic() > deadline:  # still starting up ("the database system is
                raise RuntimeError(done.stderr)  # starting up") for too long
            time.sleep(0.1)

    @contextlib.contextmanager
    def new_database(self) -> Iterator[str]:
        """A new, empty database for one test: its DSN; dropped afterwards."""
        name = f"test_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name}")
        try:
            yield f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"
        finally:
            self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def psql(self, sql: str) -> str:
        """One query's result as psql prints it unaligned (`-At`)."""
        return subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
             "-d", self.database, "-At", "-c", sql],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip

    def stop(self) -> None:
        if self.process.poll() is None:
            self._pg_ctl_stop("fast")
        shutil.rmtree(self.directory, ignore_errors=True)


def _unprivileged(directory: Path) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the package's `postgres` user."""
    if os.geteuid() != 0:
        return []
    account = pwd.getpwnam("postgres")
    os.chown(directory, account.pw_uid, account.pw_gid)
    return ["runuser", "-u", "postgres", "--"]
