#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run Kiln's test suite. Extra arguments go to pytest, e.g.
#   scripts/test.sh -m "not slow"      # the quick set
#   scripts/test.sh                    # everything (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q -p no:cacheprovider "$@"
