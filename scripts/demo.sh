#!/usr/bin/env bash
# The main job from a fresh clone: set up .venv, then fine-tune the bundled model on the bundled
# data with LoRA (`deltatune train`, no arguments). Extra arguments go to `deltatune train`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
HF_HUB_OFFLINE=1 .venv/bin/deltatune train "$@"
