#!/usr/bin/env bash
# Start triagebot with embedded defaults: SQLite file in var/, SMTP listener, web process and a worker.
#   ./run.sh           start and keep running (Ctrl-C stops everything)
#   ./run.sh --demo    also feed the bundled sample messages through it and show the cases appearing
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/triagebot run "$@"
