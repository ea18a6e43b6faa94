#!/usr/bin/env bash
# The test suite from a fresh clone: set up, then pytest. Extra arguments go to pytest,
# e.g. `bash launch/run_tests.sh -m "not slow"` for the fast subset.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
set -euo pipefail
exec python -m pytest "$@"
