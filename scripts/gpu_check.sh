#!/bin/bash
# Everything that needs a CUDA GPU, on one H100 / H200, written to $OUT (about 15 minutes of step limits in all:
# split it over device calls of at most 10 minutes with STEPS, as below):
#   1. our pretraining benchmark: the realistic length mix padded and packed (FlexAttention and dense-mask
#      SDPA), 26M eager and compiled at batch 32 and 128, 104M, 145M-MoE  -> bench_*.json, bench_*.log
#   1b. what the first H200 run left unmeasured (STEPS key "compiled"): compiled, the realistic mix padded and
#      packed, 104M and 145M-MoE; packed with 3x the samples per step (192: about the 64 rows of the padded
#      step, so the same memory), eager and compiled                    -> bench_compiled_*.json
#   2. where the step time goes (torch.profiler tables): 26M on the realistic mix padded and packed, and the GPU
#      demo's model at the demo's batch shape                           -> profiles/profile_*.txt
#   3. MiniMind2's and MiniMind-3's own trainers on the same card (../shared/anchor/run.sh) -> anchor.log
#   4. the tests marked `cuda` (bf16 autocast, fused AdamW, float16's GradScaler, --compile and packing losses,
#      FlexAttention against the dense mask, cached decoding on CUDA)    -> tests.log
#   5. scripts/demo.py with the GPU recipe (a larger model than the CPU demo), beside 4 -> demo_report.md, demo.log
#   6. the summary table (scripts/gpu_report.py)                          -> gpu.md, printed at the end
#
#   bash scripts/gpu_check.sh                     # OUT defaults to out/gpu_check
#   STEPS="bench profile anchor" ...; STEPS="compiled tests" ...; STEPS=demo DEMO_S=540 bash scripts/gpu_check.sh
#                                                 # in calls of at most 10 minutes: the GPU demo alone took over
#                                                 # 335 s on an H200
#   STEPS=demo DEMO_S=540 ...; then STEPS=compiled ...   # the next session: what 2026-11-28 did not get
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh     # on a CPU: each step at toy size, to check the script itself
#   COMMIT=<hash> bash scripts/gpu_check.sh       # the commit env.txt names, where the copy's git metadata is stale
# Each step has its own time limit, so one that hangs costs only its share;
# steps.txt says how each ended. gpu_report.py can be rerun anywhere on a copy of $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
ANCHOR=${ANCHOR:-$( [ -d shared/anchor ] && echo shared/anchor || echo ../shared/anchor )}  # beside the repo, or in it
DRY=${GPU_CHECK_DRY:-0}
STEPS=${STEPS:-bench compiled profile anchor tests demo}
mkdir -p "$OUT"
touch "$OUT/steps.txt"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

want() { [[ " $STEPS " == *" $1 "* ]]; }
step() {  # step NAME SECONDS COMMAND...: its output to $OUT/NAME.log, how it ended to steps.txt
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  want "${name%%_*}" || return 0
  echo "== $name (at most ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/steps.txt"
  tail -n 3 "$OUT/$name.log"
}

{ date -u +"date %Y-%m-%dT%H:%M:%SZ"; echo "commit ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The benchmarks and MiniMind's trainers run alone on the card; then the CUDA tests and the demo run side by side
# (neither is a speed figure). If FlexAttention failed in the packing benchmark, the tests and the demo say so
# in their logs and run with the dense mask (MINIMIND_PACKED_ATTENTION=sdpa) rather than stop there.
flex_failed() {
  python3 -c "import json,sys; rows=json.load(open(sys.argv[1])); sys.exit(0 if any(r.get('packing') and r.get('packed_attention')=='flex' and 'error' in r for r in rows) else 1)" "$OUT/bench_packing.json" 2>/dev/null
}
parallel_steps() {  # tests and demo together; each still gets its own log and steps.txt line
  local pids=()
  if flex_failed; then
    echo "FlexAttention failed in bench_packing: tests and demo run with MINIMIND_PACKED_ATTENTION=sdpa" | tee -a "$OUT/steps.txt"
    export MINIMIND_PACKED_ATTENTION=sdpa
  fi
  for s in "$@"; do eval "$s" & pids+=($!); done
  wait "${pids[@]}"
}
if [ "$DRY" = 1 ]; then
  step bench_packing 120 python3 scripts/bench_train.py --device cpu --presets tiny-cpu --length_mix realistic --packing 0 1 --packed_attention flex sdpa --steps 3 --measure 1 --json "$OUT/bench_packing.json"
  step bench_26m 120 python3 scripts/bench_train.py --device cpu --presets tiny-cpu --batch_size 4 8 --steps 3 --measure 1 --json "$OUT/bench_26m.json"
  step compiled_packing 300 python3 scripts/bench_train.py --device cpu --presets tiny-cpu --length_mix realistic --packing 0 1 --compile 1 --steps 3 --measure 1 --json "$OUT/bench_compiled_packing.json"
  step compiled_rows 300 python3 scripts/bench_train.py --device cpu --presets tiny-cpu --length_mix realistic --packing 1 --batch_size 24 --compile 0 1 --steps 3 --measure 1 --json "$OUT/bench_compiled_rows.json"
  step profile 120 python3 scripts/bench_train.py --device cpu --presets tiny-cpu --length_mix realistic --packing 0 1 --steps 4 --measure 2 --profile_dir "$OUT/profiles"
  parallel_steps 'step tests 300 python3 -m pytest -q -p no:cacheprovider tests/test_precision.py -k cpu'
else
  step bench_packing 70 python3 scripts/bench_train.py --presets 26M --length_mix realistic --packing 0 1 --packed_attention flex sdpa --batch_size 64 --steps 30 --measure 15 --json "$OUT/bench_packing.json"
  step bench_26m 100 python3 scripts/bench_train.py --presets 26M --batch_size 32 128 --compile 0 1 --steps 30 --measure 15 --json "$OUT/bench_26m.json"
  step bench_large 55 python3 scripts/bench_train.py --presets 104M 145M-MoE --batch_size 64 --steps 30 --measure 15 --json "$OUT/bench_large.json"
  step compiled_packing 110 python3 scripts/bench_train.py --presets 26M --length_mix realistic --packing 0 1 --compile 1 --batch_size 64 --steps 30 --measure 15 --json "$OUT/bench_compiled_packing.json"
  step compiled_rows 100 python3 scripts/bench_train.py --presets 26M --length_mix realistic --packing 1 --batch_size 192 --compile 0 1 --steps 30 --measure 15 --json "$OUT/bench_compiled_rows.json"
  step compiled_large 130 python3 scripts/bench_train.py --presets 104M 145M-MoE --compile 1 --batch_size 64 --steps 30 --measure 15 --json "$OUT/bench_compiled_large.json"
  step profile_26m 50 python3 scripts/bench_train.py --presets 26M --length_mix realistic --packing 0 1 --batch_size 64 --steps 12 --measure 6 --profile_dir "$OUT/profiles"
  step profile_demo 40 python3 scripts/bench_train.py --presets demo-cuda --seq_len 128 --batch_size 16 --num_workers 0 --length_mix realistic --packing 0 1 --steps 20 --measure 10 --profile_dir "$OUT/profiles"
  if [ -f "$ANCHOR/run.sh" ]; then
    T=${ANCHOR_T:-45} step anchor 105 bash "$ANCHOR/run.sh"
  elif want anchor; then
    echo "anchor skipped: no $ANCHOR/run.sh" | tee -a "$OUT/steps.txt"
  fi
  # the files that hold the cuda tests (collecting the others would import the server's and the web page's packages)
  parallel_steps 'step tests 200 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_model.py tests/test_precision.py tests/test_train.py' \
                 'step demo ${DEMO_S:-230} python3 scripts/demo.py --out_dir "$OUT/demo" --device cuda'
  [ -f "$OUT/demo/report.md" ] && cp "$OUT/demo/report.md" "$OUT/demo_report.md"
fi
python3 scripts/gpu_report.py "$OUT" > "$OUT/gpu.md" && cat "$OUT/gpu.md"
