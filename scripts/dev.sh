#!/usr/bin/env bash
# Creates (once) a virtual environment in .venv with the project installed in editable mode
# plus its test extras, then runs the given command inside it. Used by scripts/demo.sh,
# scripts/test.sh and .ci/run so a fresh machine needs nothing but python3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${OPENAI_ELASTIC_VENV:-$root/.venv}"
stamp="$venv/.installed-$(sha1sum "$root/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e "$root[test]"
    rm -f "$venv"/.installed-* && touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
exec "$@"
