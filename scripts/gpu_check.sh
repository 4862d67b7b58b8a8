#!/bin/bash
# Everything that needs a CUDA GPU, in one run of about 8 minutes on one H100 / H200, written to $OUT:
#   1. the tests marked `cuda` (bf16 autocast, fused AdamW, float16's GradScaler, --compile and packing losses,
#      cached decoding on CUDA)                                          -> tests.log
#   2. our pretraining benchmark: 26M eager and compiled at batch 32 and 128, 104M, 145M-MoE, and the
#      realistic length mix with and without packing                     -> bench_*.json, bench_*.log
#   3. MiniMind2's and MiniMind-3's own trainers on the same card (../shared/anchor/run.sh) -> anchor.log
#   4. scripts/demo.py with the GPU recipe (a larger model than the CPU demo) -> demo_report.md, demo.log
#   5. the summary table (scripts/gpu_report.py)                          -> gpu.md, printed at the end
#
#   bash scripts/gpu_check.sh                     # OUT defaults to out/gpu_check
#   STEPS="tests bench" bash scripts/gpu_check.sh # only some steps (tests bench anchor demo), e.g. to split the run
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh     # on a CPU: each step at toy size, to check the script itself
# Each step has its own time limit (600 s in all, one device call), so one that hangs costs only its share;
# steps.txt says how each ended. gpu_report.py can be rerun anywhere on a copy of $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
ANCHOR=${ANCHOR:-$( [ -d shared/anchor ] && echo shared/anchor || echo ../shared/anchor )}  # beside the repo, or in it
DRY=${GPU_CHECK_DRY:-0}
STEPS=${STEPS:-tests bench anchor demo}
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

{ date -u +"date %Y-%m-%dT%H:%M:%SZ"; echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$DRY" = 1 ]; then
  step tests 300 python3 -m pytest -q -p no:cacheprovider tests/test_precision.py -k cpu
  step bench_26m 120 python3 scripts/bench_train.py --device cpu --presets tiny-cpu --batch_size 4 8 --steps 3 --measure 1 --json "$OUT/bench_26m.json"
  step bench_packing 120 python3 scripts/bench_train.py --device cpu --presets tiny-cpu --length_mix realistic --packing 0 1 --steps 3 --measure 1 --json "$OUT/bench_packing.json"
else
  step tests 110 python3 -m pytest -q -p no:cacheprovider -m cuda tests
  step bench_26m 100 python3 scripts/bench_train.py --presets 26M --batch_size 32 128 --compile 0 1 --steps 40 --measure 20 --json "$OUT/bench_26m.json"
  step bench_large 60 python3 scripts/bench_train.py --presets 104M 145M-MoE --batch_size 64 --steps 30 --measure 15 --json "$OUT/bench_large.json"
  step bench_packing 45 python3 scripts/bench_train.py --presets 26M --length_mix realistic --packing 0 1 --batch_size 64 --steps 30 --measure 15 --json "$OUT/bench_packing.json"
  if [ -f "$ANCHOR/run.sh" ]; then
    T=${ANCHOR_T:-55} step anchor 120 bash "$ANCHOR/run.sh"
  elif want anchor; then
    echo "anchor skipped: no $ANCHOR/run.sh" | tee -a "$OUT/steps.txt"
  fi
  step demo 165 python3 scripts/demo.py --out_dir "$OUT/demo" --device cuda
  [ -f "$OUT/demo/report.md" ] && cp "$OUT/demo/report.md" "$OUT/demo_report.md"
fi
python3 scripts/gpu_report.py "$OUT" > "$OUT/gpu.md" && cat "$OUT/gpu.md"
