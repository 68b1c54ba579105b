#!/usr/bin/env bash
# The Python SDK's tests: builds the package (its gRPC stubs come from proto/), installs it in
# a virtualenv under the cargo target dir, and runs pytest against clusters the tests start
# from the built binaries. Usage: scripts/test-python.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --locked --bin engram --bin engramctl
TARGET="$(cd "$TARGET" && pwd)"
VENV="$TARGET/python-venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
# Dependencies once; the package itself every time, so the stubs follow proto/.
"$VENV/bin/pip" install -q "./sdk/python[test]"
"$VENV/bin/pip" install -q --force-reinstall --no-deps ./sdk/python
rm -rf sdk/python/build
# From outside sdk/python, so `import engram` is the installed package with its stubs.
cd "$TARGET"
ENGRAM_BIN_DIR="$PWD/debug" "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$OLDPWD/sdk/python/tests" "$@"
