#!/usr/bin/env bash
# NUM_PROCESSES training processes on this machine, on the CPU, joined by
# jax.distributed through a coordinator on localhost: a multi-host run in
# miniature, for testing the multi-process code paths. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh NUM_PROCESSES CONFIG WORKDIR [extra `vxl train` args...]

Starts NUM_PROCESSES `vxl train` processes on the CPU (JAX_PLATFORMS=cpu),
process ids 0..NUM_PROCESSES-1, coordinator localhost:PORT, each with
VXL_CPU_DEVICES simulated devices, and waits for all of them. If one fails,
the others are stopped (SIGTERM, then SIGKILL after VXL_KILL_GRACE seconds)
and the script exits non-zero. Ctrl-C / SIGTERM is forwarded to every
process as SIGTERM (each saves a checkpoint and exits); a second one kills.

  NUM_PROCESSES  number of processes (>= 1)
  CONFIG         a config file path, or the name of a JSON file under configs/
  WORKDIR        run directory; re-running the same command resumes from its
                 latest checkpoint. Logs: WORKDIR/logs/process_<i>.log
  extra          passed through to every process, e.g. --set mesh.fsdp=2

Environment:
  VXL_CPU_DEVICES  simulated CPU devices per process (default 1)
  VXL_PORT         coordinator port (default: a free port picked at start)
  VXL_PYTHON       interpreter (default: .venv/bin/python in the repo root)
  VXL_FOLLOW       1 (default): echo process 0's log here as it grows; 0: don't
  VXL_KILL_GRACE   seconds between SIGTERM and SIGKILL when stopping the other
                   processes after a failure (default 60)

Example (2 processes x 2 devices = 4 devices, FSDP over all of them):
  VXL_CPU_DEVICES=2 launch/local_multiprocess.sh 2 tiny_synthetic /tmp/vxl_mp \
      --set mesh.fsdp=4 --set mesh.data=1
EOF
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
esac
if [[ $# -lt 3 ]]; then
  usage >&2
  exit 2
fi

die() { echo "local_multiprocess.sh: $*" >&2; exit 2; }
log() { echo "local_multiprocess.sh: $*" >&2; }
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

NUM=$1
[[ "$NUM" =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCESSES must be a positive integer, got '$NUM'"
CONFIG=$2
if [[ -f "$CONFIG" ]]; then CONFIG=$(abspath "$CONFIG"); fi
WORKDIR=$(abspath "$3")
shift 3

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

PY=${VXL_PYTHON:-.venv/bin/python}
command -v "$PY" >/dev/null 2>&1 \
  || die "python '$PY' not found (run \`make test\` in $REPO to create .venv, or set VXL_PYTHON)"

CPU_DEVICES=${VXL_CPU_DEVICES:-1}
[[ "$CPU_DEVICES" =~ ^[1-9][0-9]*$ ]] || die "VXL_CPU_DEVICES must be a positive integer, got '$CPU_DEVICES'"
GRACE=${VXL_KILL_GRACE:-60}
[[ "$GRACE" =~ ^[0-9]+$ ]] || die "VXL_KILL_GRACE must be a number of seconds, got '$GRACE'"

free_port() {
  local py
  for py in .venv/bin/python python3 python; do
    if command -v "$py" >/dev/null 2>&1; then
      "$py" -c 'import socket
s = socket.socket()
s.bind(("localhost", 0))
print(s.getsockname()[1])
s.close()' && return 0
    fi
  done
  return 1
}
if [[ -n "${VXL_PORT:-}" ]]; then
  PORT=$VXL_PORT
else
  PORT=$(free_port) || die "could not find a free port (no python to ask); set VXL_PORT"
fi
if ! [[ "$PORT" =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then die "bad port '$PORT'"; fi

# Everything below is inherited by the processes only.
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$CPU_DEVICES"
export PYTHONUNBUFFERED=1

LOGDIR=$WORKDIR/logs
mkdir -p "$LOGDIR"

pids=()     # pid of process i
alive=()    # 1 while process i runs
rcs=()      # exit status of process i
follower=""
stop_requests=0
cleanup_done=0

signal_running() {  # SIG: send SIG to every process still running
  local i
  for i in "${!pids[@]}"; do
    if [[ "${alive[$i]}" == 1 ]]; then kill -s "$1" "${pids[$i]}" 2>/dev/null || true; fi
  done
}

# shellcheck disable=SC2317  # invoked by trap
on_signal() {
  stop_requests=$((stop_requests + 1))
  if ((stop_requests == 1)); then
    log "got SIG$1: sending SIGTERM to all processes (each saves a checkpoint and exits); send it again to kill them"
    signal_running TERM
  else
    log "got SIG$1 again: killing all processes (SIGKILL)"
    signal_running KILL
  fi
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

# shellcheck disable=SC2317  # invoked by trap
cleanup() {  # on any exit: leave nothing running behind
  if ((cleanup_done)); then return; fi
  cleanup_done=1
  signal_running TERM
  if [[ -n "$follower" ]]; then kill "$follower" 2>/dev/null || true; fi
}
trap cleanup EXIT

log "$NUM processes x $CPU_DEVICES CPU device(s), coordinator localhost:$PORT"
log "logs: $LOGDIR/process_<i>.log (i = 0..$((NUM - 1)))"

for ((i = 0; i < NUM; i++)); do
  logfile=$LOGDIR/process_$i.log
  # Append: a resumed run keeps the earlier runs' logs above a header.
  printf '===== %s: process %d of %d, coordinator localhost:%s =====\n' \
    "$(date '+%Y-%m-%d %H:%M:%S')" "$i" "$NUM" "$PORT" >>"$logfile"
  if ((i == 0)) && [[ "${VXL_FOLLOW:-1}" == 1 ]]; then
    # Echo process 0's log from here on (from this run's header).
    start=$(($(wc -c <"$logfile") - $(tail -n 1 "$logfile" | wc -c) + 1))
    tail -c "+$start" -F "$logfile" 2>/dev/null &
    follower=$!
  fi
  "$PY" -m vxl_jax.cli.main train --config "$CONFIG" --workdir "$WORKDIR" \
    --coordinator "localhost:$PORT" --num-processes "$NUM" --process-id "$i" \
    "$@" >>"$logfile" 2>&1 &
  pids[i]=$!
  alive[i]=1
  rcs[i]=""
done

running=$NUM
first_failed=""
killed_at=""
while ((running > 0)); do
  for i in "${!pids[@]}"; do
    [[ "${alive[$i]}" == 1 ]] || continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    alive[i]=0
    rcs[i]=$rc
    running=$((running - 1))
    if ((rc == 0)); then
      log "process $i exited (0)"
    else
      log "process $i FAILED (exit status $rc), log: $LOGDIR/process_$i.log"
      if [[ -z "$first_failed" ]]; then
        first_failed=$i
        if ((running > 0 && stop_requests == 0)); then
          log "stopping the other $running process(es): SIGTERM now, SIGKILL after ${GRACE}s"
          signal_running TERM
          killed_at=$SECONDS
        fi
      fi
    fi
  done
  ((running > 0)) || break
  if [[ -n "$killed_at" ]] && ((SECONDS - killed_at >= GRACE)); then
    log "processes still running ${GRACE}s after SIGTERM: SIGKILL"
    signal_running KILL
    killed_at=""
  fi
  # A background sleep: `wait` returns at once when a trapped signal arrives.
  sleep 1 &
  wait $! || true
done

if [[ -n "$follower" ]]; then
  sleep 0.5  # let the follower print the last lines
  kill "$follower" 2>/dev/null || true
  wait "$follower" 2>/dev/null || true
  follower=""
fi

echo "local_multiprocess.sh: exit status per process: $(for i in "${!rcs[@]}"; do printf '%s=%s ' "$i" "${rcs[$i]}"; done)" >&2
if [[ -n "$first_failed" ]]; then
  for i in "${!rcs[@]}"; do
    [[ "${rcs[$i]}" == 0 ]] && continue
    echo "----- last lines of $LOGDIR/process_$i.log -----" >&2
    tail -n 20 "$LOGDIR/process_$i.log" >&2 || true
  done
  log "failed: process $first_failed exited with ${rcs[$first_failed]} (logs in $LOGDIR)"
  rc=${rcs[$first_failed]}
  exit $((rc > 0 && rc < 256 ? rc : 1))
fi
if ((stop_requests > 0)); then
  log "stopped on request; all processes exited cleanly. Re-run the same command to resume."
else
  log "all $NUM processes finished (logs in $LOGDIR)"
fi
exit 0
