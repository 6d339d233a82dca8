#!/usr/bin/env bash
# Set everything up, then run the demo line (trains the demo model from ELPV on first run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/appliance demo "$@"
