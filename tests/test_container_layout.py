"""The container image, checked without Docker (CI has no daemon).

The test reads the Dockerfile, checks what it promises (non-root user, port, volume,
healthcheck, stop signal, entrypoint), then builds the image's file layout under a temporary
root and runs the image's ENTRYPOINT + CMD from it with the image's ENV, as the container would.
Every container path the image owns (CONTAINER_ROOTS) is rebased under that root.

How each stage is reproduced:
- builder: its RUN needs the network (pip fetches setuptools and the dependencies), and this
  test must pass offline. `pip wheel --no-build-isolation` is no way out: it needs
  setuptools >= 77 in the test's environment, which a fresh CI venv lacks. So the test packs
  the wheel itself from the files pyproject.toml tells setuptools to ship, and pip installs it
  (--no-deps --no-index) into a venv made with --without-pip at the image's venv path, as the
  Dockerfile does. The dependencies come from the test's own environment through a .pth file:
  `venv --system-site-packages` would not do, since from inside a venv it exposes the base
  interpreter's site-packages, not this venv's.
- config: its COPY and RUN instructions run as written (sh, sed, grep and the venv's
  `metering-gateway check-config`), with container paths rebased and .dockerignore applied.
- final: COPY --from lines copy inside the root and VOLUME folders are made; its RUN creates
  a user, which needs root on the host, so the facts test checks USER instead.

Then an operator config (the baked one, pointed at a fake upstream) is "mounted" at the
GATEWAY_CONFIG path, the gateway serves on a free port, HEALTHCHECK runs, the openai SDK makes
one call with a demo key of the baked config, SIGTERM stops it and the ledger is read from the
volume.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import openai

from gateway.config.loader import load_config
from tests.processes import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
CONTAINER_ROOTS = ("/etc/metering-gateway", "/opt/venv", "/data", "/src")
BUILDER = "builder"
# python:3.12-slim's own ENV that matters here; its PATH stands in for the host's tools.
BASE_IMAGE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
DEMO_KEY = "mgw-demo-research"
UPSTREAM_KEY = "sk-container-upstream"
IMAGE_METADATA = {"LABEL", "USER", "EXPOSE", "STOPSIGNAL", "HEALTHCHECK", "ENTRYPOINT", "CMD"}
HANDLED = {"ENV", "WORKDIR", "COPY", "RUN", "VOLUME", *IMAGE_METADATA}


# ---------------------------------------------------------------- Dockerfile parsing


@dataclass(frozen=True)
class Instruction:
    keyword: str
    flags: dict[str, str]
    args: str

    def argv(self) -> list[str]:
        if self.args.startswith("["):
            return json.loads(self.args)
        return ["/bin/sh", "-c", self.args]


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [each for each in self.instructions if each.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]


def logical_lines(text: str) -> Iterator[str]:
    pending = ""
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1]
            continue
        yield pending + raw
        pending = ""
    if pending:
        yield pending


def parse_instruction(line: str) -> Instruction:
    keyword, _, rest = line.strip().partition(" ")
    flags: dict[str, str] = {}
    rest = rest.strip()
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        rest = rest.strip()
    return Instruction(keyword.upper(), flags, rest)


def parse_dockerfile(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        instruction = parse_instruction(line)
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            named = len(words) == 3 and words[1].upper() == "AS"
            stages.append(Stage(base=words[0], name=words[2] if named else str(len(stages))))
        else:
            stages[-1].instructions.append(instruction)
    return stages


def apply_env(args: str, env: dict[str, str], rebase: Callable[[str], str]) -> dict[str, str]:
    updated = dict(env)
    for pair in shlex.split(args):
        name, _, value = pair.partition("=")
        updated[name] = re.sub(
            r"\$\{?(\w+)\}?", lambda match: updated.get(match[1], ""), rebase(value)
        )
    return updated


def declared_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        env = apply_env(instruction.args, env, str)
    return env


def volumes(stage: Stage) -> list[str]:
    declared = [each.args for each in stage.all("VOLUME")]
    return [v for args in declared for v in (json.loads(args) if args[0] == "[" else args.split())]


def healthcheck_argv(stage: Stage) -> list[str]:
    kind, _, command = stage.last("HEALTHCHECK").args.partition(" ")
    assert kind == "CMD", "HEALTHCHECK must run a command"
    return Instruction("CMD", {}, command.strip()).argv()


def exported_paths(stages: list[Stage], source: str) -> list[str]:
    copies = [each for each in stages[-1].all("COPY") if each.flags.get("from") == source]
    return [path for each in copies for path in shlex.split(each.args)[:-1]]


# ---------------------------------------------------------------- build context


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: depth + 1]) for depth in range(len(parts))]
    verdict = False
    for pattern in patterns:
        body = pattern.removeprefix("!").rstrip("/")
        shapes = [body[3:], "*/" + body[3:]] if body.startswith("**/") else [body]
        if any(fnmatchcase(prefix, shape) for prefix in prefixes for shape in shapes):
            verdict = not pattern.startswith("!")
    return verdict


def context_files(source: str, patterns: list[str]) -> list[Path]:
    base = REPO / source
    files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    return [path for path in files if not ignored(path.relative_to(REPO).as_posix(), patterns)]


# ---------------------------------------------------------------- the builder stage, offline


def package_files(setuptools: dict[str, Any]) -> list[Path]:
    include: list[str] = setuptools["packages"]["find"]["include"]
    package_data: dict[str, list[str]] = setuptools.get("package-data", {})
    tops = [d for d in REPO.iterdir() if any(fnmatchcase(d.name, p) for p in include)]
    files: list[Path] = []
    for init in sorted(init for top in tops for init in top.rglob("__init__.py")):
        package = init.parent
        name = package.relative_to(REPO).as_posix().replace("/", ".")
        files += sorted(package.glob("*.py"))
        for pattern in package_data.get(name, []):
            files += sorted(path for path in package.glob(pattern) if path.is_file())
    return files


def dist_info(project: dict[str, Any]) -> dict[str, str]:
    metadata = [
        "Metadata-Version: 2.1",
        f"Name: {project['name']}",
        f"Version: {project['version']}",
        f"Requires-Python: {project['requires-python']}",
        *(f"Requires-Dist: {dependency}" for dependency in project["dependencies"]),
    ]
    scripts = "".join(f"{name} = {target}\n" for name, target in project["scripts"].items())
    return {
        "METADATA": "\n".join(metadata) + "\n",
        "WHEEL": "Wheel-Version: 1.0\nGenerator: test_container_layout\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
        "entry_points.txt": "[console_scripts]\n" + scripts,
    }


def record(members: dict[str, bytes], name: str) -> bytes:
    def digest(data: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    rows = [f"{path},sha256={digest(data)},{len(data)}" for path, data in members.items()]
    return ("\n".join([*rows, f"{name},,"]) + "\n").encode()


def build_wheel(out: Path) -> Path:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    dist = f"{project['name'].replace('-', '_')}-{project['version']}"
    members = {
        path.relative_to(REPO).as_posix(): path.read_bytes()
        for path in package_files(pyproject["tool"]["setuptools"])
    }
    for name, text in dist_info(project).items():
        members[f"{dist}.dist-info/{name}"] = text.encode()
    members[f"{dist}.dist-info/RECORD"] = record(members, f"{dist}.dist-info/RECORD")
    wheel = out / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return wheel


def install_venv(venv: Path, wheel: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    (Path(site) / "test-dependencies.pth").write_text("\n".join(ours) + "\n")


# ---------------------------------------------------------------- the other stages


@dataclass(frozen=True)
class Rootfs:
    root: Path

    def __post_init__(self) -> None:
        unsafe = set(str(self.root)) & set(" #&\\'\"")
        assert not unsafe, f"rebased paths go unquoted into the Dockerfile's shell: {unsafe}"

    def path(self, container_path: str) -> Path:
        assert owned(container_path), f"{container_path} is outside {CONTAINER_ROOTS}"
        return self.root / container_path.lstrip("/")

    def text(self, text: str) -> str:
        roots = "|".join(re.escape(root) for root in CONTAINER_ROOTS)
        pattern = rf"(?<![\w./-])(?:{roots})(?![\w.-])"
        return re.sub(pattern, lambda match: str(self.root) + match[0], text)


def owned(container_path: str) -> bool:
    return any(container_path == r or container_path.startswith(r + "/") for r in CONTAINER_ROOTS)


def foreign_paths(command: str) -> list[str]:
    paths = re.findall(r"(?<![\w.:/-])/[\w./-]+", command)
    return [path for path in paths if not owned(path)]


@dataclass
class StageState:
    env: dict[str, str]
    workdir: str = "/"


class Emulator:
    """Walks the stages in order in one shared root, where a COPY --from to the same path
    has nothing left to copy."""

    def __init__(self, stages: list[Stage], rootfs: Rootfs) -> None:
        self.stages, self.rootfs = stages, rootfs
        self.states: dict[str, StageState] = {}
        self.patterns = dockerignore_patterns()

    def run(self) -> StageState:
        for stage in self.stages:
            parent = self.states.get(stage.base)
            state = (
                StageState(dict(parent.env), parent.workdir)
                if parent
                else StageState(dict(BASE_IMAGE_ENV))
            )
            for instruction in stage.instructions:
                self.apply(stage, instruction, state)
            self.states[stage.name] = state
        return state

    def apply(self, stage: Stage, instruction: Instruction, state: StageState) -> None:
        keyword, args = instruction.keyword, instruction.args
        assert keyword in HANDLED, f"the emulator does not handle {keyword} yet"
        if keyword == "ENV":
            state.env = apply_env(args, state.env, self.rootfs.text)
        elif keyword == "WORKDIR":
            state.workdir = posixpath.join(state.workdir, args)
            self.rootfs.path(state.workdir).mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            self.copy(instruction, state.workdir)
        elif keyword == "VOLUME":
            for volume in volumes(Stage("", "", [instruction])):
                self.rootfs.path(volume).mkdir(parents=True, exist_ok=True)
        elif keyword == "RUN" and stage.name != BUILDER and stage is not self.stages[-1]:
            self.shell(args, state)

    def copy(self, instruction: Instruction, workdir: str) -> None:
        *sources, dest = shlex.split(instruction.args)
        target = self.rootfs.path(posixpath.join(workdir, dest))
        if "from" in instruction.flags:
            for source in sources:
                if self.rootfs.path(source) != target:
                    shutil.copytree(self.rootfs.path(source), target, dirs_exist_ok=True)
            return
        assert dest.endswith("/"), "COPY into a folder: dest ends with /"
        for source in sources:
            base = REPO / source
            for file in context_files(source, self.patterns):
                destination = target / (file.relative_to(base) if base.is_dir() else file.name)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, destination)

    def shell(self, command: str, state: StageState) -> None:
        assert not foreign_paths(command), f"RUN would touch the host: {foreign_paths(command)}"
        done = subprocess.run(
            ["/bin/sh", "-c", self.rootfs.text(command)],
            cwd=self.rootfs.path(state.workdir),
            env=state.env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, f"RUN {command}\n{done.stdout}{done.stderr}"


# ---------------------------------------------------------------- running the image


def mount_config(path: Path, upstream_url: str) -> None:
    """Like `-v my.yaml:/etc/metering-gateway/gateway.yaml:ro`: the baked config, upstream
    replaced, over the baked file."""
    mounted, count = re.subn(r"(?m)^(\s*base_url:).*$", rf"\g<1> {upstream_url}", path.read_text())
    assert count == 1
    path.write_text(mounted)


def on_port(argv: list[str], exposed: str, port: int) -> list[str]:
    moved = [arg.replace(f":{exposed}/", f":{port}/") for arg in argv]
    if "--port" in moved:
        index = moved.index("--port") + 1
        moved[index] = str(port)
    return moved


def resolved(argv: list[str], env: dict[str, str], rootfs: Rootfs) -> list[str]:
    program = shutil.which(argv[0], path=env["PATH"])
    assert program and Path(program).is_relative_to(rootfs.root), f"{argv[0]} -> {program}"
    return [program, *argv[1:]]


@contextmanager
def started(
    argv: list[str], env: dict[str, str], cwd: Path, log: Path
) -> Iterator[subprocess.Popen[str]]:
    with log.open("w") as output:
        process = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT, text=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def ledger_rows(path: Path) -> list[tuple[str, int, str]]:
    with sqlite3.connect(path) as db:
        return list(db.execute("SELECT key_id, status, outcome FROM requests"))


# ---------------------------------------------------------------- tests


def test_dockerfile_keeps_the_container_promises() -> None:
    stages = parse_dockerfile(DOCKERFILE)
    final = stages[-1]
    names = {stage.name for stage in stages}
    assert {stage.base for stage in stages} <= {"python:3.12-slim", *names}
    assert final.base == "python:3.12-slim"
    assert final.last("USER").args.split(":")[0] == "10001"
    assert final.last("EXPOSE").args.split() == ["8787"]
    assert "/data" in volumes(final)
    assert final.last("STOPSIGNAL").args == "SIGTERM"
    check = healthcheck_argv(final)
    assert check[:2] == ["python", "-c"] and "http://127.0.0.1:8787/healthz" in check[2]
    assert final.last("ENTRYPOINT").argv() == ["metering-gateway"], "exec form: PID 1 gets TERM"
    assert final.last("CMD").argv() == ["serve", "--host", "0.0.0.0", "--port", "8787"]
    env = declared_env(final)
    assert env["GATEWAY_CONFIG"] == "/etc/metering-gateway/gateway.yaml"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert exported_paths(stages, BUILDER) == ["/opt/venv"], "only the venv leaves the builder"


def test_dockerignore_sends_what_the_build_copies_and_nothing_else() -> None:
    patterns = dockerignore_patterns()
    copies = [copy for stage in parse_dockerfile(DOCKERFILE) for copy in stage.all("COPY")]
    sources = [src for copy in copies if "from" not in copy.flags for src in copy.args.split()[:-1]]
    assert [source for source in sources if not context_files(source, patterns)] == []
    kept = ["gateway/app.py", "gateway/web/static/index.html", "config/pricing.yaml"]
    dropped = [
        ".git/HEAD",
        ".venv/bin/python",
        "data/ledger.sqlite3",
        "tests/conftest.py",
        ".pytest_cache/README.md",
        ".env",
        "gateway/__pycache__/app.cpython-312.pyc",
    ]
    assert [path for path in kept if ignored(path, patterns)] == []
    assert [path for path in dropped if not ignored(path, patterns)] == []


def test_image_layout_serves_meters_and_stops_cleanly(tmp_path: Path) -> None:
    stages = parse_dockerfile(DOCKERFILE)
    final, rootfs = stages[-1], Rootfs(tmp_path / "rootfs")
    install_venv(rootfs.path(exported_paths(stages, BUILDER)[0]), build_wheel(tmp_path))
    state = Emulator(stages, rootfs).run()

    config_path = Path(state.env["GATEWAY_CONFIG"])
    ledger = load_config(config_path).storage.sqlite_path
    assert ledger.is_relative_to(rootfs.path(volumes(final)[0])), "the ledger is on the volume"
    assert hashlib.sha256(DEMO_KEY.encode()).hexdigest() in config_path.read_text()
    [compiled_prices] = Path(state.env["GATEWAY_CACHE_DIR"]).glob("genai-prices-*.json")
    baked = compiled_prices.stat().st_mtime_ns
    fake_port, port = free_port(), free_port()
    mount_config(config_path, f"http://127.0.0.1:{fake_port}/v1")

    exposed = final.last("EXPOSE").args.split()[0]
    env = {**state.env, "OPENAI_API_KEY": UPSTREAM_KEY}
    command = resolved(
        on_port(final.last("ENTRYPOINT").argv() + final.last("CMD").argv(), exposed, port),
        env,
        rootfs,
    )
    healthcheck = resolved(on_port(healthcheck_argv(final), exposed, port), env, rootfs)
    fake_env = {**os.environ, "FAKE_UPSTREAM_KEY": UPSTREAM_KEY}
    fake_argv = [sys.executable, "-m", "gateway", "fake-upstream", "--port", str(fake_port)]
    workdir, gateway_log = rootfs.path(state.workdir), tmp_path / "gateway.log"

    with started(fake_argv, fake_env, REPO, tmp_path / "fake.log") as fake:
        wait_for_port(fake_port, fake, tmp_path / "fake.log")
        assert subprocess.run(healthcheck, env=env, capture_output=True).returncode != 0
        with started(command, env, workdir, gateway_log) as gateway:
            wait_for_port(port, gateway, gateway_log)
            assert subprocess.run(healthcheck, env=env, timeout=10).returncode == 0
            with openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=DEMO_KEY, max_retries=0
            ) as client:
                reply = client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
                )
            assert reply.choices[0].message.content
            gateway.send_signal(signal.SIGTERM)
            assert gateway.wait(timeout=20) == 0, gateway_log.read_text()

    assert ledger_rows(ledger) == [("research-dev", 200, "ok")]
    assert compiled_prices.stat().st_mtime_ns == baked, "the baked prices were read, not rebuilt"
