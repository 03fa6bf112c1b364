#!/usr/bin/env bash
# What the test suite needs on a fresh machine; the README's test command is
# `bash scripts/test.sh && python -m pytest -q`.
#
# 1. The real servers the tests start on 127.0.0.1, from Debian's packages, where missing:
#    Chromium and its ChromeDriver (the portal's browser tests), Redis and PostgreSQL (the
#    scale-out tests). apt-get runs as root, or through sudo; without either the script says
#    what to install and stops.
# 2. The project and its test extras into the current Python environment (a venv, say).
# 3. ruff.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
command -v chromium >/dev/null || packages+=(chromium)
command -v chromedriver >/dev/null || packages+=(chromium-driver)
command -v redis-server >/dev/null || packages+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || packages+=(postgresql)
command -v psql >/dev/null || packages+=(postgresql-client)
if ((${#packages[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        as_root=()
    elif command -v sudo >/dev/null; then
        as_root=(sudo)
    else
        echo "scripts/test.sh: the tests need Debian packages: ${packages[*]}" >&2
        echo "install them as root (apt-get install ${packages[*]}), then run this again" >&2
        exit 2
    fi
    echo "scripts/test.sh: installing ${packages[*]}" >&2
    "${as_root[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${packages[@]}" >/dev/null
fi

python -m pip install --quiet '.[test]'
ruff check .
