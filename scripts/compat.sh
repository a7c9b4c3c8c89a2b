#!/usr/bin/env bash
# The test suite on one (Python, torch) pair, in its own venv: scripts/compat.sh 3.13 2.14.1
#
# The venv is .venv-compat/py<python>-torch<torch>. Every pin of constraints.txt applies except
# torch's, which is replaced by the one asked for, so the pair differs from `make test` only in
# the interpreter and torch. Extras whose releases do not support that torch are the pair's
# business: pip refuses and this script fails, which is how an unsupported pair is found.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:?usage: scripts/compat.sh PYTHON_VERSION TORCH_VERSION}
torch=${2:?usage: scripts/compat.sh PYTHON_VERSION TORCH_VERSION}
shift 2

# An interpreter for that version: pythonX.Y on PATH if it runs, else pyenv's newest X.Y.
find_python() {
    if command -v "python$py" >/dev/null && "python$py" -c "" 2>/dev/null; then
        command -v "python$py"
        return
    fi
    local root
    root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
    local found
    found=$(ls -d "$root"/versions/"$py".* 2>/dev/null | sort -V | tail -1 || true)
    if [ -n "$found" ] && [ -x "$found/bin/python$py" ]; then
        echo "$found/bin/python$py"
        return
    fi
    echo "compat: no Python $py found (neither python$py nor pyenv's $root/versions/$py.*)" >&2
    exit 1
}

venv=.venv-compat/py$py-torch$torch
stamp=$venv/.installed
if [ ! -f "$stamp" ] || [ "$stamp" -ot pyproject.toml ] || [ "$stamp" -ot constraints.txt ]; then
    python=$(find_python)
    rm -rf "$venv"
    "$python" -m venv "$venv"
    grep -v '^torch==' constraints.txt > "$venv/constraints.txt"
    echo "torch==$torch" >> "$venv/constraints.txt"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -c "$venv/constraints.txt" "torch==$torch"
    "$venv/bin/python" -m pip install --quiet -c "$venv/constraints.txt" -e ".[dev,lab]"
    touch "$stamp"
fi
echo "compat: Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())')," \
    "torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
