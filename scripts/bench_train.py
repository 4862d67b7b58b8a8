"""Benchmark the real pretraining step: tokens/s, MFU, peak memory and time waiting for data.

    python scripts/bench_train.py                                   # CUDA: 26M, 104M, MoE-145M at seq 512
    python scripts/bench_train.py --presets 26M --batch_size 32 128 --compile 0 1   # four runs, one process
    python scripts/bench_train.py --length_mix realistic --packing 0 1
    python scripts/bench_train.py --device cpu                      # CPU: a tiny config, a few steps

It writes a synthetic pretrain jsonl, runs train_pretrain.py's own main() (the same code path a user
runs, not a copy) for --steps optimizer steps, and reads the numbers that the training loop itself logs
over the last --measure steps (the first steps include warm-up and compilation). --profile_dir adds 5 steps
to each run, after the timed ones, under torch.profiler, and writes where their time went. --batch_size, --compile,
--packing, --packed_attention and --num_workers take several values: every combination runs, one after another.
A run that fails is recorded with its error (in the table and the JSON) and the next one runs.
"""
import argparse
import itertools
import json
import math
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import trainer_utils  # noqa: E402
from model import model_minimind  # noqa: E402
from model.model_minimind import PRESETS  # noqa: E402
from trainer.cli import ArgumentParser, UserError, device_name, int_in, nonneg_int, positive_int, run_main  # noqa: E402
from trainer.file_io import atomic_write_text  # noqa: E402

CPU_TINY = {"tiny-cpu": dict(hidden_size=128, num_hidden_layers=4),
            "tiny-cpu-moe": dict(hidden_size=128, num_hidden_layers=2, use_moe=True),
            "demo-cuda": dict(hidden_size=256, num_hidden_layers=8)}  # scripts/demo.py's GPU model
PROFILE_STEPS = 5


def synthetic_corpus(path, n_lines, seq_len, length_mix, seed=0):
    """Text from the shipped tokenizer's own vocabulary. 'full': every line longer than seq_len, so every
    position is filled; 'realistic': most lines far shorter than seq_len (log-uniform lengths)."""
    from dataset.lm_dataset import load_tokenizer
    tok = load_tokenizer(os.path.join(ROOT, "model"))
    rng = random.Random(seed)
    vocab = [t for t in range(100, tok.vocab_size)]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_lines):
            n = seq_len + 8 if length_mix == "full" else int(math.exp(rng.uniform(math.log(16), math.log(seq_len))))
            text = tok.decode(rng.choices(vocab, k=n))
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def run_one(preset_name, run, args, data_path, out_dir):
    """One train_pretrain.main() run. Returns the loop's record for the last --measure steps, and the times at
    which the loop logged the start and the end of those steps (to line them up with GPU monitor samples)."""
    import train_pretrain
    cfg = {**PRESETS, **CPU_TINY}[preset_name]
    sys.argv = ["train_pretrain.py", "--dim", str(cfg["hidden_size"]), "--n_layers", str(cfg["num_hidden_layers"]),
                "--use_moe", str(int(cfg.get("use_moe", False))), "--data_path", data_path, "--out_dir", out_dir,
                "--max_seq_len", str(args.seq_len), "--batch_size", str(run["batch_size"]), "--accumulation_steps", "1",
                "--max_steps", str(args.steps + (PROFILE_STEPS if args.profile_dir else 0)),
                "--log_interval", str(args.steps - args.measure), "--save_interval", "1000000",
                "--device", args.device, "--dtype", args.dtype, "--num_workers", str(run["num_workers"]),
                "--learning_rate", "5e-4", "--packing", str(run["packing"]), "--compile", str(run["compile"])]
    model_minimind.PACKED_ATTENTION = run["packed_attention"]
    if run["compile"]:
        torch._dynamo.reset()  # compile for this run's own shapes, not a dynamic-shape graph left by the previous run
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    log_times = []
    logger_log = trainer_utils.Logger.log

    def log_with_time(self, record):  # observe the loop's own log lines; they come after a host sync (loss.item())
        logger_log(self, record)
        log_times.append(time.time())
    trainer_utils.Logger.log = log_with_time
    optimizer_step = trainer_utils.optimizer_step
    if args.profile_dir:
        profiler = step_profiler(args, os.path.join(args.profile_dir, f"profile_{preset_name}_b{run['batch_size']}_c{run['compile']}_p"
                                                    f"{run['packing']}{'_' + run['packed_attention'] if run['packing'] else ''}.txt"))

        def step_and_profile(*a, **kw):  # the loop's optimizer step, then the profiler's step count
            taken = optimizer_step(*a, **kw)
            profiler.step()
            return taken
        trainer_utils.optimizer_step = step_and_profile
        profiler.start()
    try:
        train_pretrain.main()
    finally:
        trainer_utils.Logger.log = logger_log
        trainer_utils.optimizer_step = optimizer_step
        if args.profile_dir:
            profiler.stop()
    with open(os.path.join(out_dir, "logs", f"pretrain_{cfg['hidden_size']}{'_moe' if cfg.get('use_moe') else ''}.jsonl")) as f:
        records = [json.loads(line) for line in f]
    timed = [i for i, r in enumerate(records) if r["step"] == args.steps][0]  # the profiled steps come after
    return records[timed], log_times[timed - 1:timed + 1]


def step_profiler(args, path):
    """torch.profiler over the PROFILE_STEPS steps after the timed ones; writes the time per step (its ProfilerStep
    events) and its table of operations (by time on the device for CUDA, on the CPU otherwise) to path."""
    from torch.profiler import ProfilerActivity, profile, schedule
    cuda = args.device.startswith("cuda")

    def write(prof):
        events = prof.key_averages()
        step = next(e for e in events if e.key.startswith("ProfilerStep"))
        table = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=30)
        atomic_write_text(f"{PROFILE_STEPS} profiled steps, {step.cpu_time_total / step.count / 1e3:.1f} ms each "
                          f"(with the profiler on)\n{table}\n", path)
    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                   schedule=schedule(wait=args.steps, warmup=0, active=PROFILE_STEPS, repeat=1), on_trace_ready=write)


def main():
    cuda = torch.cuda.is_available()
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", choices=[*PRESETS, *CPU_TINY], default=list(PRESETS) if cuda else ["tiny-cpu"])
    ap.add_argument("--device", type=device_name, default="cuda" if cuda else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seq_len", type=int_in(2), default=512 if cuda else 128)
    ap.add_argument("--batch_size", type=positive_int, nargs="+", default=[64 if cuda else 8])
    ap.add_argument("--steps", type=int_in(2), default=60 if cuda else 8)
    ap.add_argument("--measure", type=positive_int, default=30 if cuda else 4, help="steps at the end that are timed")
    ap.add_argument("--num_workers", type=nonneg_int, nargs="+", default=[4 if cuda else 0])
    ap.add_argument("--packing", type=int, nargs="+", default=[0], choices=[0, 1])
    ap.add_argument("--compile", type=int, nargs="+", default=[0], choices=[0, 1])
    ap.add_argument("--packed_attention", nargs="+", default=["flex"], choices=["flex", "sdpa"],
                    help="with --packing 1 on CUDA: FlexAttention's block mask, or SDPA with a dense bool mask")
    ap.add_argument("--length_mix", choices=["full", "realistic"], default="full")
    ap.add_argument("--profile_dir", help="profile 5 more steps of each run (after the timed ones) and write the top "
                                          "operations and ms per step to a text file per run here")
    ap.add_argument("--json", help="also write the results here: a JSON list, one object per run (scripts/gpu_report.py reads it)")
    args = ap.parse_args()
    if args.measure >= args.steps:
        raise UserError(f"--measure {args.measure} must be below --steps {args.steps} (the first steps warm up)")
    if args.profile_dir and args.steps % (args.steps - args.measure):
        # the loop logs every (steps - measure) steps; the timed window must end on a log line before the profiled steps
        raise UserError(f"--profile_dir needs --steps a multiple of --steps minus --measure (e.g. --steps 30 --measure 15), "
                        f"not --steps {args.steps} --measure {args.measure}")
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bench_")
    data = os.path.join(tmp, "bench.jsonl")
    synthetic_corpus(data, n_lines=max(args.batch_size) * args.steps * (4 if args.length_mix == "realistic" else 1) + 64,
                     seq_len=args.seq_len, length_mix=args.length_mix)
    hardware = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    runs = [dict(zip(("batch_size", "compile", "packing", "packed_attention", "num_workers"), combo))
            for combo in itertools.product(args.batch_size, args.compile, args.packing, args.packed_attention, args.num_workers)]
    runs = [r for r in runs if r["packing"] or r["packed_attention"] == args.packed_attention[0]]  # only packing reads it
    rows = []
    for name in args.presets:
        for i, run in enumerate(runs):
            t_start = time.time()
            row = dict(preset=name, **run, length_mix=args.length_mix, seq_len=args.seq_len, dtype=args.dtype,
                       steps=args.steps, measure=args.measure, device=hardware, torch=torch.__version__)
            try:
                record, measured = run_one(name, run, args, data, os.path.join(tmp, f"{name}_{i}"))
            except Exception as e:  # noqa: BLE001 - one failing configuration must not cost the others' numbers
                print(f"run {name} {run} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                rows.append(dict(row, run_window=[t_start, time.time()], error=f"{type(e).__name__}: {str(e)[:300]}"))
            else:
                rows.append(dict(row, run_window=[t_start, time.time()], measure_window=measured,
                                 **{k: record[k] for k in ("tokens_per_s", "nonpad_tokens_per_s", "data_wait", "loss",
                                                           "mfu", "peak_mem_gib") if k in record}))
            if args.json:  # after every run, so a run cut short by a time limit keeps the ones before it
                atomic_write_text(json.dumps(rows, indent=1) + "\n", args.json)
    print(f"\n{hardware}, {args.dtype}, seq {args.seq_len}, length mix {args.length_mix}")
    print(f"{'preset':<12} {'batch':>5} {'compile':>7} {'packing':>8} {'workers':>7} {'tokens/s':>12} {'non-pad tok/s':>14} "
          f"{'MFU':>7} {'peak GiB':>9} {'data wait':>10}")
    for r in rows:
        packing = f"1 {r['packed_attention']}" if r["packing"] else "0"
        head = f"{r['preset']:<12} {r['batch_size']:>5} {r['compile']:>7} {packing:>8} {r['num_workers']:>7}"
        if "error" in r:
            print(f"{head}  failed: {r['error'][:80]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
        mem = f"{r['peak_mem_gib']:.2f}" if "peak_mem_gib" in r else "n/a"
        print(f"{head} {r['tokens_per_s']:>12,.0f} {r['nonpad_tokens_per_s']:>14,.0f} {mfu:>7} {mem:>9} {100 * r['data_wait']:>9.1f}%")

if __name__ == "__main__":
    run_main(main)
