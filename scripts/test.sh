#!/usr/bin/env bash
# The test command of the README: sets up the environment, builds, runs the whole suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
echo "== running the test suite"
"$PY" -m pytest tests -q -p no:cacheprovider "$@"
