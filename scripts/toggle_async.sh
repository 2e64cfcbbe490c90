#!/usr/bin/env bash
# toggle_async.sh enable|disable|status [canary options...]
#
# The old on/off switch for the async path, kept for operators used to it:
#   enable   -> canary resume    (continue the staged rollout; after a rollback, from stage 1)
#   disable  -> canary rollback  (all traffic to the baseline at once; stays so until enable)
#   status   -> canary status
# Extra options go to canary (e.g. -c /etc/canary.yaml, --admin URL). The admin listener
# and token are found as canary finds them: -c FILE / CANARY_CONFIG, or CANARY_ADMIN_URL
# and CANARY_ADMIN_TOKEN. Set REASON to record why in the rollout history.
# Exit codes are canary's: 0 ok, 1 failure (e.g. proxy unreachable), 2 usage/config error.
set -euo pipefail

usage() {
  echo "usage: $(basename "$0") enable|disable|status [canary options, e.g. -c FILE]" >&2
  exit 2
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if command -v canary >/dev/null 2>&1; then
  CANARY=(canary)
elif [ -x "$ROOT/.venv/bin/python" ]; then
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  CANARY=("$ROOT/.venv/bin/python" -m proxy)
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  CANARY=(python3 -m proxy)
fi

[ $# -ge 1 ] || usage
action=$1
shift
case "$action" in
  enable)  exec "${CANARY[@]}" resume --reason "${REASON:-toggle_async.sh enable}" "$@" ;;
  disable) exec "${CANARY[@]}" rollback --reason "${REASON:-toggle_async.sh disable}" "$@" ;;
  status)  exec "${CANARY[@]}" status "$@" ;;
  -h|--help) usage ;;
  *) echo "$(basename "$0"): unknown action '$action'" >&2; usage ;;
esac
