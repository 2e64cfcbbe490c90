#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run it.
# Usage: bash scripts/test.sh [pytest args...]
#   PYTHON  the interpreter, 3.11 or newer (default: python3)
#   VENV    the venv to make or reuse (default: .venv); one per interpreter
# Exits with pytest's exit code; 2 when the interpreter is missing or too old.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
MIN_PYTHON=3.11

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# "3.13" for a working interpreter, nothing otherwise.
python_version() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

# A clear one-line message instead of a traceback when the interpreter cannot run the suite.
require_python() {
  local version
  version=$(python_version "$PY")
  if [ -z "$version" ]; then
    echo "scripts/test.sh: cannot run '$PY': install Python $MIN_PYTHON or newer, or set PYTHON=/path/to/python3" >&2
    exit 2
  fi
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "scripts/test.sh: canary-proxy needs Python $MIN_PYTHON or newer; '$PY' is $version (set PYTHON=/path/to/python3.11 or newer)" >&2
    exit 2
  fi
}

# Debian packages the tests need, installed in one apt-get run when missing.
install_debian_packages() {
  local missing=()
  [ -x /usr/bin/chromium ] || missing+=(chromium)  # the dashboard test drives Debian's headless Chromium
  # the replica tests start Debian's redis-server (on a free port, without persistence)
  command -v redis-server >/dev/null || missing+=(redis-server)
  if ! "$PY" -c 'import ensurepip' 2>/dev/null && [[ "$(command -v "$PY")" == /usr/bin/* ]]; then
    missing+=(python3-venv)  # Debian's own python3 makes venvs only with it
  fi
  [ ${#missing[@]} -eq 0 ] && return
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The venv for $PY (made anew when it holds another Python version), with the [test] extra.
make_venv() {
  local want have
  want=$(python_version "$PY")
  have=$( [ -x "$VENV/bin/python" ] && python_version "$VENV/bin/python" || true)
  if [ "$have" != "$want" ]; then
    [ -z "$have" ] || echo "scripts/test.sh: $VENV holds Python $have, not $want: making it anew" >&2
    "$PY" -m venv --clear "$VENV"
  fi
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[test]'
}

require_python
install_debian_packages
make_venv
echo "scripts/test.sh: Python $(python_version "$VENV/bin/python") in $VENV" >&2
exec "$VENV/bin/pytest" "$@"
