#!/usr/bin/env bash
# Set up, then run the test suite, one pytest-xdist worker per core (tests/conftest.py gives each
# its share of the threads; no test uses pytest-benchmark, which xdist would switch off with a warning).
# Extra arguments go to pytest (e.g. -m "not slow"; -n 0: one process).
# pytest's exit code 5 (no test collected) is a failure here, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
"${PYTHON:-python3}" -m pytest tests -n auto --dist loadgroup -p no:benchmark "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
