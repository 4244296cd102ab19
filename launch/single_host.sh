#!/usr/bin/env bash
# One training process on this machine, using all of its local devices:
# every visible GPU, or N simulated CPU devices when VXL_CPU_DEVICES=N is set.
# See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/single_host.sh CONFIG WORKDIR [extra `vxl train` args...]

Runs one `vxl train` process with all local devices (GPUs by default).

  CONFIG    a config file path, or the name of a JSON file under configs/
            (e.g. tiny_synthetic, videoxl_7b_stage1, videoxl_7b_stage2)
  WORKDIR   run directory (checkpoints, logs); re-running with the same
            WORKDIR resumes from its latest checkpoint
  extra     passed through, e.g. --set mesh.fsdp=8 --set data.batch_size=16

Environment:
  VXL_CPU_DEVICES=N   run on the CPU with N simulated devices
                      (exports JAX_PLATFORMS=cpu and
                      XLA_FLAGS=--xla_force_host_platform_device_count=N)
  VXL_PYTHON          interpreter (default: .venv/bin/python in the repo root)

Example:
  VXL_CPU_DEVICES=4 launch/single_host.sh tiny_synthetic /tmp/vxl_run \
      --set mesh.fsdp=2 --set mesh.data=-1
EOF
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
esac
if [[ $# -lt 2 ]]; then
  usage >&2
  exit 2
fi

# Paths given relative to the caller's directory must survive the cd below.
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
CONFIG=$1
WORKDIR=$(abspath "$2")
shift 2
if [[ -f "$CONFIG" ]]; then CONFIG=$(abspath "$CONFIG"); fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

PY=${VXL_PYTHON:-.venv/bin/python}
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "single_host.sh: python '$PY' not found (run \`make test\` in $REPO to create .venv, or set VXL_PYTHON)" >&2
  exit 2
fi

if [[ -n "${VXL_CPU_DEVICES:-}" ]]; then
  if ! [[ "$VXL_CPU_DEVICES" =~ ^[1-9][0-9]*$ ]]; then
    echo "single_host.sh: VXL_CPU_DEVICES must be a positive integer, got '$VXL_CPU_DEVICES'" >&2
    exit 2
  fi
  export JAX_PLATFORMS=cpu
  # Must be in the environment before jax is imported; keeps any flags already set.
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$VXL_CPU_DEVICES"
fi

if [[ -n "${VXL_COORDINATOR:-}" ]]; then
  echo "single_host.sh: warning: VXL_COORDINATOR is set ($VXL_COORDINATOR); the trainer will try to join a multi-process run" >&2
fi

echo "single_host.sh: $PY -m vxl_jax.cli.main train --config $CONFIG --workdir $WORKDIR $*" >&2

# The trainer saves a checkpoint on SIGTERM (not on SIGINT), so Ctrl-C and
# SIGTERM sent to this script become one SIGTERM to the trainer; a second one
# kills it. (Started in the background, the trainer ignores the terminal's
# SIGINT itself.)
"$PY" -m vxl_jax.cli.main train --config "$CONFIG" --workdir "$WORKDIR" "$@" &
child=$!
stops=0
# shellcheck disable=SC2317  # invoked by trap
forward() {
  stops=$((stops + 1))
  if ((stops == 1)); then
    echo "single_host.sh: got SIG$1: SIGTERM to the trainer (it saves a checkpoint and exits); again to kill it" >&2
    kill -s TERM "$child" 2>/dev/null || true
  else
    echo "single_host.sh: got SIG$1 again: SIGKILL" >&2
    kill -s KILL "$child" 2>/dev/null || true
  fi
}
trap 'forward INT' INT
trap 'forward TERM' TERM
while kill -0 "$child" 2>/dev/null; do
  sleep 1 &
  wait $! || true   # returns at once when a trapped signal arrives
done
rc=0
wait "$child" || rc=$?
exit "$rc"
