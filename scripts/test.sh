#!/usr/bin/env bash
# The whole test suite from a fresh clone: set up .venv with the test extras, then pytest.
# Extra arguments go to pytest (e.g. -k lora, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh test
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
