#!/usr/bin/env bash
# The main job from a fresh clone: set up, build the built-in dataset if absent,
# train configs/quickstart_cpu.yaml. Extra arguments go to launch/train.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
set -euo pipefail
exec python launch/train.py --config configs/quickstart_cpu.yaml "$@"
