#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs what the tests start (dovecot, postfix's
# smtp-sink), makes sure the local PostgreSQL runs, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
bash scripts/services.sh
exec .venv/bin/python -m pytest "$@"
