#!/usr/bin/env bash
# The main command of the README: sets up the environment, builds, runs the demo.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
echo "== solo-fast demo"
"$VENV/bin/solo-fast" demo "$@"
