#!/usr/bin/env bash
# GPU benchmark suite: one H100 / H200, about 8 minutes, installs nothing.
#
#   bash benchmarks/gpu_suite.sh                          # from the repository root, in the project's environment
#   OUT=/tmp/gpu PEAK_TFLOPS=989 SUITE_SECONDS=480 bash benchmarks/gpu_suite.sh
#
# Steps, each in its own process(es) under `timeout`. The suite keeps one deadline
# (SUITE_SECONDS) and gives a step at most what is left, minus the time kept for the
# steps after it; a step that would get less than MIN_STEP_S is skipped and says so.
#
#   1. nvidia-smi basics and a JAX device check (stops here if JAX sees no GPU)
#   2. benchmarks/prefill_bench.py --config videoxl_7b --dtype bfloat16 --ratios 16 --repeats 1
#      --peak-tflops $PEAK_TFLOPS --frame-chunk $FRAME_CHUNK, one invocation per frame count
#      (PREFILL_FRAMES, the 2048 headline first) so that a timeout loses only its own point.
#      --frame-chunk: the features stage otherwise runs CLIP on all frames at once.
#      10000 frames is not a prefill_bench point here: --repeats 1 still runs the 7B prefill four
#      times (warm-up and timed, prefill and e2e), minutes each at that length; it is timed once,
#      frames streamed, as the first rung of step 4.
#   3. benchmarks/train_bench.py --config videoxl_1_5b_shape --dtype bfloat16 --frames $TRAIN_FRAMES
#      --peak-tflops $PEAK_TFLOPS $TRAIN_FLAGS (default remat per layer and per window: without
#      it the window scan keeps every window's CLIP activations for the backward and 64+ frames
#      do not fit).
#   4. The longest video that fits: benchmarks/aot_memory.py --execute (videoxl_7b, bfloat16,
#      ratio 16, frames streamed as uint8) at FIT_FRAMES in increasing order, one process each,
#      until the first OOM, a failure, or the deadline. Each rung compiles (and records XLA's
#      memory analysis on the GPU), then runs the prefill; XLA allocates a program's buffers at
#      launch, so a run still going after its execute budget fits. The first rung (10000 frames)
#      gets a longer budget (FIT_FIRST_EXEC_S) so that its time is measured when the deadline allows.
#   5. $OUT/summary.md: the tables of every JSON result above plus each step's status, and the
#      compile-only plan beside what was measured: `vxl aot --target $AOT_TARGET` (run first, on the
#      CPU: no device used) for the 7B prefill at AOT_FRAMES, its per-device total against the
#      measured peak and its estimated time (analytic FLOPs at 40% MFU) against the measured one.
#
# Environment (defaults):
#   OUT=./gpu_results  PEAK_TFLOPS=989 (H100/H200 SXM, bf16 dense)  SUITE_SECONDS=480  MIN_STEP_S=45
#   PYTHON=.venv/bin/python if it exists, else python3
#   PREFILL_FRAMES="2048 128 512"  FRAME_CHUNK=64  PREFILL_CAP_S=170
#   TRAIN_FRAMES="64 128"  TRAIN_FLAGS="--remat-layer dots_no_batch --remat-window full"  TRAIN_CAP_S=170
#   TRAIN_KEEP_S=150 (kept for the train step while the prefill points run)
#   FIT_FRAMES="10000 20000 30000 40000 60000 80000 120000"  FIT_FIRST_EXEC_S=150  FIT_EXEC_S=15
#   FIT_COMPILE_S=100 (expected start + init + compile of one rung, to size its execute budget)
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (JAX's default 0.75 would report OOM for videos that fit)
#   AOT_TARGET=h100 (h200 on an H200)  AOT_FRAMES="2048 10000"  AOT_CAP_S=240
#
# Outputs under $OUT (relative to the repository root; its aot/, prefill/, train/ and fit/ folders are
# emptied first): nvidia-smi.txt, jax_device.txt, steps.tsv, aot/{log.txt,prefill.json},
# prefill/<F>/{log.txt,videoxl_7b_bfloat16.{json,md,png}},
# train/{log.txt,train.json}, fit/<F>/{log.txt,aot_memory.{json,md}}, fit/ladder.txt, summary.md.

set -u -o pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-./gpu_results}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
SUITE_SECONDS=${SUITE_SECONDS:-480}
MIN_STEP_S=${MIN_STEP_S:-45}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PREFILL_FRAMES=${PREFILL_FRAMES:-"2048 128 512"}
FRAME_CHUNK=${FRAME_CHUNK:-64}
PREFILL_CAP_S=${PREFILL_CAP_S:-170}
TRAIN_FRAMES=${TRAIN_FRAMES:-"64 128"}
TRAIN_FLAGS=${TRAIN_FLAGS:-"--remat-layer dots_no_batch --remat-window full"}
TRAIN_CAP_S=${TRAIN_CAP_S:-170}
TRAIN_KEEP_S=${TRAIN_KEEP_S:-150}
FIT_FRAMES=${FIT_FRAMES:-"10000 20000 30000 40000 60000 80000 120000"}
FIT_FIRST_EXEC_S=${FIT_FIRST_EXEC_S:-150}
FIT_EXEC_S=${FIT_EXEC_S:-15}
FIT_COMPILE_S=${FIT_COMPILE_S:-100}
AOT_TARGET=${AOT_TARGET:-h100}
AOT_FRAMES=${AOT_FRAMES:-"2048 10000"}
AOT_CAP_S=${AOT_CAP_S:-240}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
KILL_GRACE_S=10     # timeout -k: SIGKILL this long after SIGTERM
SUMMARY_KEEP_S=15   # kept at the end for the summary

mkdir -p "$OUT"
rm -rf "$OUT/aot" "$OUT/prefill" "$OUT/train" "$OUT/fit"     # this suite's own folders: no stale result in the summary
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\texit\tseconds\ttimeout_s\n' > "$STEPS"
START=$SECONDS

left() { echo $(( SUITE_SECONDS - (SECONDS - START) )); }
say() { printf '[%4ds] %s\n' $(( SECONDS - START )) "$*"; }

# step_budget CAP KEEP: seconds a step may take now (its cap, or what is left after KEEP seconds
# for later steps, the kill grace and the summary).
step_budget() {
    local cap=$1 keep=$2 avail
    avail=$(( $(left) - keep - KILL_GRACE_S - SUMMARY_KEEP_S ))
    (( avail < cap )) && cap=$avail
    echo "$cap"
}

# run_step NAME BUDGET LOG CMD...: runs CMD under timeout, output to LOG; records and echoes the status
# (ok / timeout / oom / failed / skipped).
run_step() {
    local name=$1 budget=$2 log=$3 t0 rc status
    shift 3
    mkdir -p "$(dirname "$log")"
    if (( budget < MIN_STEP_S )); then
        printf '%s\tskipped (time)\t-\t0\t%s\n' "$name" "$budget" >> "$STEPS"
        say "$name: skipped, ${budget} s left for it" >&2
        echo skipped
        return
    fi
    say "$name (timeout ${budget} s): $*" >&2
    t0=$SECONDS
    timeout -k "$KILL_GRACE_S" "$budget" "$@" > "$log" 2>&1
    rc=$?
    if (( rc == 0 )); then status=ok
    elif (( rc == 124 || rc == 137 )); then status=timeout
    elif grep -qiE 'RESOURCE_EXHAUSTED|out of memory|execute: oom' "$log"; then status=oom
    else status=failed
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" $(( SECONDS - t0 )) "$budget" >> "$STEPS"
    say "$name: $status (exit $rc, $(( SECONDS - t0 )) s)" >&2
    tail -n 3 "$log" | sed 's/^/    /' >&2
    echo "$status"
}

# ---------------------------------------------------------------- 1. the machine
say "suite: OUT=$OUT PEAK_TFLOPS=$PEAK_TFLOPS SUITE_SECONDS=$SUITE_SECONDS PYTHON=$PYTHON"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>&1
    echo
    nvidia-smi 2>&1
} > "$OUT/nvidia-smi.txt" || true
head -n 2 "$OUT/nvidia-smi.txt"
if ! timeout 120 "$PYTHON" -c 'import jax, sys; d = jax.devices()[0]; print("jax", jax.__version__, d.platform, d.device_kind); sys.exit(d.platform != "gpu")' 2>&1 | tail -n 1 | tee "$OUT/jax_device.txt"; then
    say "JAX sees no GPU (see $OUT/jax_device.txt); stopping"
    exit 1
fi

# ---------------------------------------------------------------- 1b. the compile-only plan (CPU, no device)
# shellcheck disable=SC2086  # AOT_FRAMES is a word list
mkdir -p "$OUT/aot"
run_step aot "$(step_budget "$AOT_CAP_S" $(( TRAIN_KEEP_S + 120 )))" "$OUT/aot/log.txt" \
    "$PYTHON" -m vxl_jax.cli.main aot --target "$AOT_TARGET" --job prefill --config videoxl_7b --ratio 16 \
    --frames $AOT_FRAMES --json "$OUT/aot/prefill.json" > /dev/null

# ---------------------------------------------------------------- 2. prefill, 7B shape
for F in $PREFILL_FRAMES; do
    budget=$(step_budget "$PREFILL_CAP_S" "$TRAIN_KEEP_S")
    run_step "prefill_$F" "$budget" "$OUT/prefill/$F/log.txt" \
        "$PYTHON" benchmarks/prefill_bench.py --config videoxl_7b --dtype bfloat16 --ratios 16 --frames "$F" \
        --repeats 1 --frame-chunk "$FRAME_CHUNK" --peak-tflops "$PEAK_TFLOPS" --out "$OUT/prefill/$F" > /dev/null
done

# ---------------------------------------------------------------- 3. train step, 1.5B shape
budget=$(step_budget "$TRAIN_CAP_S" 0)
# shellcheck disable=SC2086  # TRAIN_FRAMES and TRAIN_FLAGS are word lists
run_step train "$budget" "$OUT/train/log.txt" \
    "$PYTHON" benchmarks/train_bench.py --config videoxl_1_5b_shape --dtype bfloat16 --frames $TRAIN_FRAMES \
    --peak-tflops "$PEAK_TFLOPS" $TRAIN_FLAGS --json "$OUT/train/train.json" > /dev/null

# ---------------------------------------------------------------- 4. the longest video that fits
fit_status() {   # the execute status aot_memory.py recorded for $1 frames, or "-"
    "$PYTHON" - "$OUT/fit/$1/aot_memory.json" <<'PY' 2>/dev/null || echo -
import json, sys
rows = json.load(open(sys.argv[1]))
print(rows[0].get("execute", {}).get("status", "-"))
PY
}

mkdir -p "$OUT/fit"
largest=none; first_oom=none; stopped="the list ran out"; exec_s=$FIT_FIRST_EXEC_S
for F in $FIT_FRAMES; do
    budget=$(step_budget $(( FIT_COMPILE_S + exec_s + 30 )) 0)
    run_exec=$(( budget - FIT_COMPILE_S - 20 ))
    (( run_exec > exec_s )) && run_exec=$exec_s
    (( run_exec < 5 )) && run_exec=5
    step=$(run_step "fit_$F" "$budget" "$OUT/fit/$F/log.txt" \
        "$PYTHON" benchmarks/aot_memory.py --config videoxl_7b --dtype bfloat16 --ratio 16 --frames "$F" \
        --skip-train --execute --execute-budget "$run_exec" --out "$OUT/fit/$F")
    executed=$(fit_status "$F")
    if [[ "$step" == skipped ]]; then stopped="the deadline (before $F frames)"; break; fi
    case "$executed" in
        ok|running) largest="$F frames" ;;
        oom) first_oom="$F frames"; stopped="the first OOM"; break ;;
        started) stopped="$F frames cut by the timeout while executing (fit unknown)"; break ;;
        *) if [[ "$step" == oom ]]; then first_oom="$F frames"; stopped="the first OOM (before executing)";
           else stopped="$F frames: $step"; fi
           break ;;
    esac
    exec_s=$FIT_EXEC_S
done
printf 'largest fitting: %s\nfirst OOM: %s\nstopped by: %s\n' "$largest" "$first_oom" "$stopped" \
    | tee "$OUT/fit/ladder.txt"

# ---------------------------------------------------------------- 5. summary
"$PYTHON" - "$OUT" <<'PY'
import glob, json, os, sys

out = sys.argv[1]
md = ["# GPU suite results", ""]


def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def gib(n):
    return "-" if n is None else f"{n / 2**30:.1f}"


smi = read(os.path.join(out, "nvidia-smi.txt")).splitlines()
md += ["GPU: " + (smi[1] if len(smi) > 1 and smi[1].strip() else "unknown") + "  ",
       "JAX: " + read(os.path.join(out, "jax_device.txt")).strip() + "  ",
       f"XLA_PYTHON_CLIENT_MEM_FRACTION={os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')}", ""]

md += ["## Steps", "", "| step | status | exit | seconds | timeout s |", "|---|---|---|---|---|"]
for line in read(os.path.join(out, "steps.tsv")).splitlines()[1:]:
    md.append("| " + " | ".join(line.split("\t")) + " |")

rows = []
for path in glob.glob(os.path.join(out, "prefill", "*", "*.json")):
    rows += json.loads(read(path, "[]"))
md += ["", "## Compressed prefill, videoxl_7b, bfloat16 (prefill_bench: features precomputed, median of 1 after a warm-up)",
       ""]
if rows:
    md += ["| frames | ratio | features s | prefill s | 15 decode s | e2e s | KV entries | KV MiB | prefill TFLOP/s | MFU"
           " | peak device GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["frames"]):
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        md.append(f"| {r['frames']} | {r['ratio']} | {r['features']:.3f} | {r['prefill']:.3f} | {r['decode']:.3f} | "
                  f"{r['e2e']:.3f} | {r['kv_entries']} | {r['kv_bytes'] / 2**20:.1f} | {r['prefill_tflops']:.1f} | "
                  f"{mfu} | {r.get('peak_device_gib', float('nan')):.1f} |")
else:
    md.append("no results (see steps and prefill/*/log.txt)")

train = []
for line in read(os.path.join(out, "train", "log.txt")).splitlines():
    if line.startswith("{"):
        try:
            train.append(json.loads(line))
        except ValueError:
            pass
md += ["", "## Train step, videoxl_1_5b_shape, bfloat16 compute (train_bench: median of its repeats)", ""]
if train:
    md += ["| frames | ratio | step s | tokens/s | compile s | model TFLOP | TFLOP/s | MFU | peak device GiB | loss |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in train:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        md.append(f"| {r['frames']} | {r['ratio']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['compile_s']:.0f} | "
                  f"{r['model_tflop']:.1f} | {r['tflops']:.1f} | {mfu} | {r.get('peak_device_gib', float('nan')):.1f} | "
                  f"{r['loss']:.3f} |")
else:
    md.append("no results (see steps and train/log.txt)")

fit = []
for path in glob.glob(os.path.join(out, "fit", "*", "aot_memory.json")):
    fit += json.loads(read(path, "[]"))
md += ["", "## Longest video: videoxl_7b, bfloat16, ratio 16, uint8 frames streamed (aot_memory.py --execute)", "",
       "XLA's memory analysis of the GPU program (arguments + output + temporaries) against the device's limit, "
       "then one run: ok = finished (its time is the whole streamed prefill, CLIP included), running = still "
       "going after its budget (allocated at launch: fits), oom = out of memory.", ""]
if fit:
    md += ["| frames | windows | KV entries/layer | KV buffer GiB | frames GiB | arguments GiB | temp GiB | output GiB |"
           " total GiB | device limit GiB | run | run s | peak GiB | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(fit, key=lambda r: r["frames"]):
        ex = r.get("execute", {})
        secs = f"{ex['seconds']:.1f}" if "seconds" in ex else "-"
        md.append(f"| {r['frames']} | {r['windows']} | {r['kv_entries']} | {gib(r['kv_buffer_bytes_bfloat16'])} | "
                  f"{gib(r['frames_bytes'])} | {gib(r['argument_bytes'])} | {gib(r['temp_bytes'])} | "
                  f"{gib(r['output_bytes'])} | {gib(r['total_bytes'])} | {gib(r.get('device_limit_bytes'))} | "
                  f"{ex.get('status', '-')} | {secs} | {gib(ex.get('peak_bytes_in_use'))} | {r['compile_s']:.0f} |")
else:
    md.append("no results (see steps and fit/*/log.txt)")
md += ["", "```", read(os.path.join(out, "fit", "ladder.txt")).strip(), "```", ""]

# The compile-only plan (vxl aot, compiled on the CPU for the target) against what this GPU measured: memory
# against the streamed run's peak (fit) or prefill_bench's, time against the streamed run's or prefill_bench's
# features + prefill.
plan = json.loads(read(os.path.join(out, "aot", "prefill.json"), "[]"))
md += ["## The compile-only plan against the measurement (vxl aot, videoxl_7b prefill, ratio 16)", ""]
if plan:
    by_fit = {r["frames"]: r.get("execute", {}) for r in fit}
    by_bench = {r["frames"]: r for r in rows}
    md += ["| frames | target | plan total GiB | measured peak GiB | peak / plan | estimated s (40% MFU) | measured s | "
           "measured by |", "|---|---|---|---|---|---|---|---|"]
    for p in sorted(plan, key=lambda r: r["frames"]):
        f, ex, bench = p["frames"], by_fit.get(p["frames"], {}), by_bench.get(p["frames"])
        peak = ex.get("peak_bytes_in_use")
        seconds = ex.get("seconds") if ex.get("status") == "ok" else None
        source = "fit run" if peak or seconds else "-"
        if bench is not None and peak is None and "peak_device_gib" in bench:
            peak, source = bench["peak_device_gib"] * 2**30, "prefill_bench"
        if bench is not None and seconds is None:
            seconds, source = bench["features"] + bench["prefill"], "prefill_bench"
        total = p["per_device_bytes"]["total"]
        ratio = f"{peak / total:.2f}" if peak else "-"
        md.append(f"| {f} | {p['target']} | {gib(total)} | {gib(peak)} | {ratio} | {p['estimate']['seconds']:.1f} | "
                  f"{'-' if seconds is None else f'{seconds:.1f}'} | {source} |")
else:
    md.append("no plan (see aot/log.txt)")
md.append("")

with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(md))
print("\n".join(md))
PY
say "done: $OUT/summary.md ($(( SECONDS - START )) s)"
