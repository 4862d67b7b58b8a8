"""The summary of a scripts/gpu_check.sh run, as markdown (what benchmarks/gpu.md holds).

    python scripts/gpu_report.py out/gpu_check > benchmarks/gpu.md

Reads what gpu_check.sh wrote into the folder: env.txt, steps.txt, bench_*.json (scripts/bench_train.py --json),
anchor.log (MiniMind's own trainers), tests.log and demo_report.md. Every number comes from those files; a
step that did not run is said to be missing, never filled in.
"""
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trainer.cli import ArgumentParser, UserError, run_main  # noqa: E402

ANCHOR_RESULT = re.compile(r"RESULT (\S+): ([\d.]+) steps/s, ([\d.]+) k tokens/s")
REFERENCE = "MiniMind3-26M-compile-b128"  # the ratio column divides by this anchor run


def read(path):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def anchor_results(text):
    """{label: tokens/s} from run.sh's RESULT lines."""
    return {m[1]: float(m[3]) * 1e3 for m in ANCHOR_RESULT.finditer(text or "")}


def bench_rows(folder):
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "bench_*.json"))):
        with open(path, encoding="utf-8") as f:
            rows += [dict(r, source=os.path.basename(path)) for r in json.load(f)]
    return rows


def fmt_rate(x):
    return f"{x / 1e6:.3f}M" if x >= 1e5 else f"{x:,.0f}"


def report(folder):
    lines = ["# GPU check", ""]
    env = read(os.path.join(folder, "env.txt"))
    lines += ["```", (env or "env.txt missing").strip(), "```", ""]
    steps = read(os.path.join(folder, "steps.txt"))
    lines += ["Steps (exit status, seconds):", "", "```", (steps or "steps.txt missing").strip(), "```", ""]

    anchors = anchor_results(read(os.path.join(folder, "anchor.log")))
    ref = anchors.get(REFERENCE)
    lines += ["## Pretraining speed (bf16, synthetic text)", ""]
    rows = bench_rows(folder)
    if rows:
        lines += ["| run | preset | seq | batch | compile | packing | length mix | tokens/s | non-pad tokens/s | MFU | peak GiB "
                  f"| data wait | vs {REFERENCE} |", "| " + " | ".join(["---"] * 13) + " |"]
        for r in rows:
            packing = f"1 ({r.get('packed_attention', 'sdpa')})" if r["packing"] else "0"
            head = (f"| ours | {r['preset']} | {r['seq_len']} | {r['batch_size']} | {r['compile']} | {packing} | "
                    f"{r['length_mix']} |")
            if "error" in r:
                lines.append(f"{head} failed: {r['error'][:120].replace('|', '/')} | | | | | |")
                continue
            ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "n/a (no anchor run)"
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
            mem = f"{r['peak_mem_gib']:.2f}" if "peak_mem_gib" in r else "n/a"
            lines.append(f"{head} {fmt_rate(r['tokens_per_s'])} | {fmt_rate(r['nonpad_tokens_per_s'])} | {mfu} | "
                         f"{mem} | {100 * r['data_wait']:.1f}% | {ratio} |")
        for label, rate in anchors.items():
            ratio = f"{rate / ref:.2f}x" if ref else "n/a"
            lines.append(f"| MiniMind | {label} | 512 | | | | full | {fmt_rate(rate)} | | | | | {ratio} |")
    else:
        lines.append("No benchmark results (bench_*.json missing).")
    if not anchors:
        lines += ["", "MiniMind's own trainers did not report (anchor.log missing or without RESULT lines)."]
    lines.append("")

    tests = read(os.path.join(folder, "tests.log"))
    summary = [ln for ln in (tests or "").splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    lines += ["## CUDA tests", "", f"`{summary[-1].strip('= ')}`" if summary else "tests.log missing or without a summary line", ""]

    demo = read(os.path.join(folder, "demo_report.md"))
    lines += ["## GPU demo", ""]
    lines += [demo.replace("# MiniMind demo report", "").strip() if demo else "demo_report.md missing", ""]
    return "\n".join(lines)


def main():
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("folder", help="the $OUT folder of a gpu_check.sh run")
    args = ap.parse_args()
    if not os.path.isdir(args.folder):
        raise UserError(f"{args.folder}: no such folder (the OUT of scripts/gpu_check.sh)")
    print(report(args.folder))


if __name__ == "__main__":
    run_main(main)
