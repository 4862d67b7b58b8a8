"""Train the whole chain on the bundled demo data and show, on held-out data, that every stage worked.

    python scripts/demo.py                 # CPU: a tiny model, under 10 minutes on 2 cores
    python scripts/demo.py --out_dir out/demo_cuda --device cuda   # GPU: a 4.5x larger model, a few minutes

Runs the real scripts one after another (pretrain -> full SFT -> DPO -> reasoning distillation -> GRPO, and a
LoRA identity adapter on the DPO model; then a smaller student trained twice from one start, with plain SFT
and with the full SFT model as its distillation teacher), then evaluates each stage before and after and
writes {out_dir}/report.md and {out_dir}/loss_curves.png. Exits 1 if a stage misses its bar. --ppo also
trains PPO from the reasoning model and reports it (no bar).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from trainer.cli import ArgumentParser, UserError, device_name, run_main  # noqa: E402

DATA = os.path.join(ROOT, "dataset", "demo")
# --smeared_keys: the demo data plus one copy drill for every two other pretraining documents (README, "Smeared
# keys": as many as the others made tool choice fall to 40%; one for every four taught no copying), and 1000 of
# the 4150 SFT conversations using tools instead of 300 (the answers' copying of results is learned there)
COPY_DATA = os.path.join(ROOT, "dataset", "demo_copy")
COPY_DATA_FLAGS = ["--pretrain_drills", "3685", "--sft_tools", "1000", "--sft", "3150"]
ASSISTANT_NAME = ["MiniMind"]
LORA_NAME = ["小星", "XiaoXing"]

# Model and recipe per device. The CPU recipe is sized for 2 cores and 10 minutes in all.
RECIPES = {
    "cpu": dict(model=["--dim", "128", "--n_layers", "4", "--n_heads", "4", "--n_kv_heads", "2"],
                pretrain=["--max_seq_len", "128", "--batch_size", "16", "--accumulation_steps", "1", "--learning_rate", "2e-3",
                          "--warmup_iters", "20", "--epochs", "1", "--packing", "1"],
                sft=["--max_seq_len", "1024", "--batch_size", "16", "--learning_rate", "1e-3", "--epochs", "2", "--warmup_iters", "10",
                     "--packing", "1"],
                dpo=["--max_seq_len", "128", "--batch_size", "8", "--learning_rate", "5e-5", "--epochs", "1", "--beta", "0.1"],
                reason=["--max_seq_len", "160", "--batch_size", "16", "--learning_rate", "1e-3", "--epochs", "3", "--warmup_iters", "10"],
                lora=["--max_seq_len", "128", "--batch_size", "16", "--learning_rate", "5e-3", "--epochs", "3", "--lora_rank", "16",
                      "--lora_targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"],
                grpo=["--max_seq_len", "64", "--batch_size", "8", "--num_generations", "8", "--max_new_tokens", "96",
                      "--learning_rate", "1e-4", "--max_steps", "20", "--rewards", "format,answer", "--beta", "0.02"],
                ppo=["--max_seq_len", "64", "--batch_size", "16", "--num_generations", "2", "--max_new_tokens", "80",
                     "--mini_batch_size", "16", "--learning_rate", "1e-4", "--critic_learning_rate", "1e-3", "--max_steps", "30",
                     "--rewards", "format,answer"],
                # white-box distillation: a smaller student, trained twice from one seeded random init for the same
                # steps on the same batches (CE only, and CE + KL to the full SFT model); see student_start()
                student=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                student_sft=["--max_seq_len", "128", "--batch_size", "16", "--learning_rate", "2e-3", "--warmup_iters", "10",
                             "--max_steps", "150", "--packing", "1"],
                distill=["--alpha", "0.5", "--temperature", "1"]),
}
# On a GPU the step time of models this small is kernel launches, not arithmetic: a model with 4.5x the compute
# per token (7.3M parameters, MiniMind2's shape at width 256) costs about the same minutes there. Everything else
# is the CPU recipe, so the same bars hold; `--recipe cuda --device cpu` runs it on a CPU (hours on 2 cores).
RECIPES["cuda"] = dict(RECIPES["cpu"], model=["--dim", "256", "--n_layers", "8", "--n_heads", "8", "--n_kv_heads", "2"])

BARS = [("SFT in-format", "sft_in_format", 0.90, ">="),
        ("Tool use: right tool in a well-formed call", "tool_right", 0.90, ">="),
        ("Tool use: final answer holds the tool's result", "tool_answer", 0.70, ">="),
        ("Thinking off: empty think block, then the answer", "think_off", 0.90, ">="),
        ("LoRA new name (with adapter)", "lora_with", 0.80, ">="),
        ("LoRA new name (without adapter)", "lora_without", 0.10, "<="), ("DPO preference accuracy", "dpo_acc", 0.80, ">="),
        ("Reasoning template", "reason_template", 0.90, ">="),
        ("GRPO right-answer gain over the reasoning model (points)", "grpo_gain", 0.10, ">="),
        ("GRPO template change (points, must not fall)", "grpo_template_change", 0.0, ">=")]


def stage(script, *flags, log, name=None):
    """Run one training script like a user would, echoing its output; its time goes to log[name or script]."""
    cmd = [sys.executable, os.path.join(ROOT, script), *flags]
    print(f"\n$ {' '.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:])}", flush=True)
    t0, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        print("   ", line.rstrip(), flush=True)
    if proc.wait() != 0:
        raise UserError(f"{script} failed (exit {proc.returncode}); its output is above")
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds too: on a shared machine wall time says more about the neighbours than about the stage
    log[name or script] = {"wall": round(time.time() - t0, 1),
                           "cpu": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1)}


def ensure_data(data, *flags):
    """Build the demo data into `data` (deterministic, offline, seconds; flags go to build_demo_data.py) unless
    every file is already there from a build with the same flags."""
    subprocess.run([sys.executable, os.path.join(ROOT, "dataset", "build_demo_data.py"), "--out_dir", data, "--if_missing", *flags],
                   cwd=ROOT, check=True)


def student_start(config_kwargs, path, seed=0):
    """The one start both distillation students train from: the small model's seeded random init. No pretraining
    (the demo's minutes are spent), and it is where a teacher's soft targets add most over the labels alone."""
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from trainer_utils import save_weights
    torch.manual_seed(seed)
    save_weights(MiniMindForCausalLM(MiniMindConfig(**config_kwargs)), path)


def plot_curves(out_dir, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    order = ["pretrain", "full_sft", "rlhf", "reason", "grpo", "ppo", "lora", "student_ce", "student_kd"]
    logs = sorted((f for f in os.listdir(os.path.join(out_dir, "logs")) if f.endswith(".jsonl")),
                  key=lambda f: next((i for i, p in enumerate(order) if f.startswith(p)), len(order)))
    fig, axes = plt.subplots(1, len(logs), figsize=(4 * len(logs), 3.2))
    for ax, name in zip(axes, logs):
        with open(os.path.join(out_dir, "logs", name), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        # RL: the rollouts' mean reward; distillation: the loss and its two parts
        keys = ["reward"] if "reward" in rows[0] else [k for k in ("loss", "ce", "kd") if k in rows[0]]
        for key in keys:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
        if len(keys) > 1:
            ax.legend()
        ax.set_title(name[:-len(".jsonl")])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("reward" if keys == ["reward"] else "loss")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out_dir", default="out/demo")
    ap.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default=None, help="model and recipe (default: the --device's own)")
    ap.add_argument("--skip_training", action="store_true", help="only evaluate checkpoints already in --out_dir")
    ap.add_argument("--ppo", action="store_true", help="also train PPO from the reasoning model and report it (no bar)")
    ap.add_argument("--smeared_keys", action="store_true",
                    help="train the smeared-keys model instead, on data whose pretraining is a third copy drills and whose SFT "
                         "has 1000 tool conversations (built into dataset/demo_copy/), pretraining two epochs at 3e-3 and SFT "
                         "one epoch: it learns in-context copying (README, 'Smeared keys')")
    args = ap.parse_args()
    out = os.path.abspath(args.out_dir)
    os.makedirs(out, exist_ok=True)
    cuda = args.device.startswith("cuda")
    recipe = RECIPES[args.recipe or ("cuda" if cuda else "cpu")]
    data = DATA
    if args.smeared_keys:
        data = COPY_DATA
        recipe = dict(recipe, model=[*recipe["model"], "--smeared_keys", "1"],
                      pretrain=[*recipe["pretrain"], "--learning_rate", "3e-3", "--epochs", "2"],  # the last flag wins
                      sft=[*recipe["sft"], "--epochs", "1"])
    # Eager also on CUDA (where --compile defaults on): the stages are short, and the padded batches' changing
    # shapes would make each compile again. For the same reason packed stages use the dense mask there, not
    # FlexAttention: on the H200 its compile made the first 10 steps of each of the four packed stages take
    # 11-60 s (about 2 of the run's 5.6 minutes). DataLoader workers only on CUDA: on 2 CPU cores they would
    # take cores from the math, while the H200 run without them waited for data 10-34% of each stage's time.
    if cuda:
        os.environ.setdefault("MINIMIND_PACKED_ATTENTION", "sdpa")
    system = ["--out_dir", out, "--device", args.device, *([] if cuda else ["--num_workers", "0"]), "--log_interval", "10",
              "--save_interval", "100000", "--dtype", "bfloat16", "--compile", "0"]
    common = [*recipe["model"], *system]
    student = [f for k, v in recipe["student"].items() for f in (f"--{k}", str(v))]
    s_dim = recipe["student"]["hidden_size"]
    t_start = time.time()
    ensure_data(data, *(COPY_DATA_FLAGS if args.smeared_keys else []))
    times = {}
    if not args.skip_training:
        stage("train_pretrain.py", *common, *recipe["pretrain"], "--data_path", f"{data}/pretrain_hq.jsonl", log=times)
        stage("train_full_sft.py", *common, *recipe["sft"], "--data_path", f"{data}/sft_mini_512.jsonl", log=times)
        stage("train_dpo.py", *common, *recipe["dpo"], "--data_path", f"{data}/dpo.jsonl", log=times)
        stage("train_distill_reason.py", *common, *recipe["reason"], "--data_path", f"{data}/r1_mix_1024.jsonl", log=times)
        stage("train_grpo.py", *common, *recipe["grpo"], "--data_path", f"{data}/rlaif.jsonl", log=times)
        if args.ppo:
            stage("train_ppo.py", *common, *recipe["ppo"], "--data_path", f"{data}/rlaif.jsonl", log=times)
        stage("train_lora.py", *common, *recipe["lora"], "--lora_name", "lora_identity",
              "--data_path", f"{data}/lora_identity.jsonl", log=times)
        start = os.path.join(out, f"student_start_{s_dim}.pth")
        student_start(recipe["student"], start)
        students = [*student, *system, *recipe["student_sft"], "--from_weight", start, "--data_path", f"{data}/sft_mini_512.jsonl"]
        stage("train_full_sft.py", *students, "--save_weight", "student_ce", log=times, name="student CE only")
        stage("train_distillation.py", *students, *recipe["distill"], "--save_weight", "student_kd", "--teacher_weight", "full_sft",
              "--teacher_dim", recipe["model"][1], "--teacher_n_layers", recipe["model"][3], log=times, name="student distilled")
    t_train = time.time() - t_start

    # ---------------------------------------------------------------- evaluation on held-out files
    from dataset.lm_dataset import load_tokenizer
    from model.model_lora import load_lora
    from model.model_minimind import MiniMindForCausalLM, count_parameters
    from scripts import demo_eval as ev
    from trainer_utils import load_weights, lora_weight_path
    print("\nevaluating on held-out data ...", flush=True)
    torch.manual_seed(0)
    device = torch.device(args.device)
    tok = load_tokenizer(os.path.join(ROOT, "model"))
    dim = recipe["model"][1]
    load = lambda prefix: load_weights(os.path.join(out, f"{prefix}_{dim}.pth")).to(device).eval()
    pre, sft, rlhf, reason, grpo = load("pretrain"), load("full_sft"), load("rlhf"), load("reason"), load("grpo")
    untrained = MiniMindForCausalLM(pre.config).to(device).eval()
    r = {}
    r["pre_before"] = ev.pretrain_metrics(untrained, tok, f"{data}/pretrain_eval.jsonl", 128, device)
    r["pre_after"] = ev.pretrain_metrics(pre, tok, f"{data}/pretrain_eval.jsonl", 128, device)
    probe = ev.copy_probe(tok, f"{data}/pretrain_eval.jsonl")  # one probe for the three models
    r["copy"] = {name: ev.copy_accuracy(m, probe, device) for name, m in (("untrained", untrained), ("pretrain", pre), ("sft", sft))}
    r["sft_before"] = ev.chat_metrics(pre, tok, f"{data}/sft_eval.jsonl", device, ASSISTANT_NAME)
    r["sft_after"] = ev.chat_metrics(sft, tok, f"{data}/sft_eval.jsonl", device, ASSISTANT_NAME)
    r["tool_before"] = ev.tool_metrics(pre, tok, f"{data}/tool_eval.jsonl", device)
    r["tool_after"] = ev.tool_metrics(sft, tok, f"{data}/tool_eval.jsonl", device)
    r["tool_before_free"], r["tool_free"] = (ev.tool_metrics(m, tok, f"{data}/tool_eval.jsonl", device, guided=False)
                                             for m in (pre, sft))  # the same without the ToolCallGuide
    r["dpo_before"] = ev.preference_metrics(sft, sft, tok, f"{data}/dpo_eval.jsonl", 128, device)
    r["dpo_after"] = ev.preference_metrics(rlhf, sft, tok, f"{data}/dpo_eval.jsonl", 128, device)
    r["reason_before"] = ev.reasoning_metrics(rlhf, tok, f"{data}/r1_eval.jsonl", device)
    r["reason_after"] = ev.reasoning_metrics(reason, tok, f"{data}/r1_eval.jsonl", device)
    r["think_on"] = ev.reasoning_metrics(reason, tok, f"{data}/r1_eval.jsonl", device, enable_thinking=True)
    r["think_off"] = ev.reasoning_metrics(reason, tok, f"{data}/r1_eval.jsonl", device, enable_thinking=False)
    t_rl, cpu_rl = time.time(), time.process_time()
    r["grpo_before"] = ev.rl_metrics(reason, tok, f"{data}/rlaif_eval.jsonl", device)
    r["grpo_after"] = ev.rl_metrics(grpo, tok, f"{data}/rlaif_eval.jsonl", device)
    if args.ppo:
        r["ppo_after"] = ev.rl_metrics(load("ppo"), tok, f"{data}/rlaif_eval.jsonl", device)
    times["GRPO evaluation"] = {"wall": round(time.time() - t_rl, 1), "cpu": round(time.process_time() - cpu_rl, 1)}
    r["lora_without"], _, _ = ev.identity_share(rlhf, tok, f"{data}/lora_identity_eval.jsonl", device, LORA_NAME)
    r["sft_loss_base"] = ev.sft_loss(rlhf, tok, f"{data}/sft_eval.jsonl", 128, device)
    load_lora(rlhf, lora_weight_path(out, "lora_identity", dim))
    r["lora_with"], lora_samples, lora_prompts = ev.identity_share(rlhf, tok, f"{data}/lora_identity_eval.jsonl", device, LORA_NAME)
    r["sft_loss_lora"] = ev.sft_loss(rlhf, tok, f"{data}/sft_eval.jsonl", 128, device)
    steps = recipe["student_sft"][recipe["student_sft"].index("--max_steps") + 1]
    student_ce, student_kd = (load_weights(os.path.join(out, f"{p}_{s_dim}.pth")).to(device).eval() for p in ("student_ce", "student_kd"))
    r["student_ce"] = ev.sft_loss(student_ce, tok, f"{data}/sft_eval.jsonl", 128, device)
    r["student_kd"] = ev.sft_loss(student_kd, tok, f"{data}/sft_eval.jsonl", 128, device)
    r["teacher"] = ev.sft_loss(sft, tok, f"{data}/sft_eval.jsonl", 128, device)
    flat = {"sft_in_format": r["sft_after"]["in_format"], "lora_with": r["lora_with"], "lora_without": r["lora_without"],
            "dpo_acc": r["dpo_after"]["accuracy"], "reason_template": r["reason_after"]["template"],
            "tool_right": r["tool_after"]["right_tool"], "tool_answer": r["tool_after"]["answer_has_result"],
            "think_off": r["think_off"]["template"],
            "grpo_gain": r["grpo_after"]["correct"] - r["grpo_before"]["correct"],
            "grpo_template_change": r["grpo_after"]["template"] - r["grpo_before"]["template"]}

    # ---------------------------------------------------------------- report
    pct = lambda x: f"{100 * x:.1f}%"
    lines = ["# MiniMind demo report", "",
             f"Model: {' '.join(recipe['model'])} ({sum(p.numel() for p in pre.parameters()) / 1e6:.2f}M parameters), "
             f"device {args.device}, training {t_train / 60:.1f} min, total {(time.time() - t_start) / 60:.1f} min.",
             f"All numbers are measured now on held-out files under {os.path.relpath(data, ROOT)}/*_eval.jsonl, never seen in training.", "",
             "| stage | metric | before | after |", "| --- | --- | --- | --- |",
             f"| pretrain | held-out loss (perplexity), vs untrained | {r['pre_before']['loss']:.3f} ({r['pre_before']['ppl']:.0f}) | "
             f"{r['pre_after']['loss']:.3f} ({r['pre_after']['ppl']:.1f}) |",
             f"| pretrain | in-context copying: 8-32 held-out tokens, then the same again (next-token accuracy on the repeat; "
             f"full SFT model: {pct(r['copy']['sft'])}), vs untrained | {pct(r['copy']['untrained'])} | {pct(r['copy']['pretrain'])} |",
             f"| full SFT | replies closed by `<\\|im_end\\|>` ({r['sft_after']['n']} prompts), vs pretrain | {pct(r['sft_before']['in_format'])} | {pct(r['sft_after']['in_format'])} |",
             f"| full SFT | identity questions answered as MiniMind ({r['sft_after']['n_identity']}) | {pct(r['sft_before']['identity_named'])} | {pct(r['sft_after']['identity_named'])} |",
             f"| tool use | well-formed call naming the right tool ({r['tool_after']['n_tool']} held-out tool questions, all three tools offered; "
             f"calls guided as eval_model.py and the server guide them) | {pct(r['tool_before']['right_tool'])} | {pct(r['tool_after']['right_tool'])} |",
             f"| tool use | the same, the model left free (`--guided_tool_calls 0`; no bar) | {pct(r['tool_before_free']['right_tool'])} "
             f"| {pct(r['tool_free']['right_tool'])} |",
             f"| tool use | call arguments give the reference result | {pct(r['tool_before']['right_args'])} | {pct(r['tool_after']['right_args'])} |",
             f"| tool use | final answer holds the tool's result (real round trip) | {pct(r['tool_before']['answer_has_result'])} | {pct(r['tool_after']['answer_has_result'])} |",
             f"| tool use | questions needing no tool answered without a call ({r['tool_after']['n_plain']}) | {pct(r['tool_before']['plain_direct'])} | {pct(r['tool_after']['plain_direct'])} |",
             f"| DPO | preference accuracy, implicit reward ({r['dpo_after']['n']} pairs; ties count half) | {pct(r['dpo_before']['accuracy'])} | {pct(r['dpo_after']['accuracy'])} |",
             f"| DPO | mean reward margin | {r['dpo_before']['margin']:.4f} | {r['dpo_after']['margin']:.4f} |",
             f"| reasoning | replies in `<think>`/`<answer>` template ({r['reason_after']['n']}), vs DPO model | {pct(r['reason_before']['template'])} | {pct(r['reason_after']['template'])} |",
             f"| reasoning | right answer | {pct(r['reason_before']['correct'])} | {pct(r['reason_after']['correct'])} |",
             f"| reasoning | thinking on (`enable_thinking`: prompt opens `<think>`): template / right answer | — | {pct(r['think_on']['template'])} / {pct(r['think_on']['correct'])} |",
             f"| reasoning | thinking off (empty think block pre-filled): empty block then `<answer>` / right answer | — | {pct(r['think_off']['template'])} / {pct(r['think_off']['correct'])} |",
             f"| GRPO | held-out problems answered right, greedy ({r['grpo_after']['n']}), vs reasoning model | {pct(r['grpo_before']['correct'])} | {pct(r['grpo_after']['correct'])} |",
             f"| GRPO | replies in `<think>`/`<answer>` template, vs reasoning model | {pct(r['grpo_before']['template'])} | {pct(r['grpo_after']['template'])} |",
             *([f"| PPO (no bar) | held-out right answers / template, after | | {pct(r['ppo_after']['correct'])} / {pct(r['ppo_after']['template'])} |"]
               if args.ppo else []),
             f"| LoRA identity | answers with the new name 小星, without / with adapter | {pct(r['lora_without'])} | {pct(r['lora_with'])} |",
             f"| LoRA identity | held-out SFT loss (general ability kept), without / with adapter | {r['sft_loss_base']:.3f} | {r['sft_loss_lora']:.3f} |",
             f"| distillation | held-out SFT loss of a {count_parameters(student_ce) / 1e6:.2f}M student, {steps} steps from one random init: "
             f"CE only / distilled from the full SFT model (teacher's own: {r['teacher']:.3f}) | {r['student_ce']:.3f} | {r['student_kd']:.3f} |",
             "", "## Bars", ""]
    ok = True
    for label, key, bar, op in BARS:
        passed = flat[key] >= bar if op == ">=" else flat[key] <= bar
        ok &= passed
        lines.append(f"- {'PASS' if passed else 'FAIL'} {label}: {pct(flat[key])} (bar {op} {pct(bar)})")
    passed = r["student_kd"] < r["student_ce"]
    ok &= passed
    lines.append(f"- {'PASS' if passed else 'FAIL'} Distillation: distilled student's held-out SFT loss {r['student_kd']:.3f} "
                 f"(bar < the CE-only student's {r['student_ce']:.3f}, same start, batches and steps)")
    lines += ["", "## Samples", ""]
    for q, a in r["sft_after"]["samples"]:
        lines.append(f"- SFT 👶 {q!r} 🤖 {a!r}")
    for q, first, results, final in r["tool_after"]["samples"]:
        lines.append(f"- tools 👶 {q!r} 🤖 {first!r} 🔧 {results!r} 🤖 {final!r}")
    for q, a in r["reason_after"]["samples"]:
        lines.append(f"- reasoning 👶 {q!r} 🤖 {a!r}")
    for q, a in r["grpo_after"]["samples"]:
        lines.append(f"- GRPO 👶 {q!r} 🤖 {a!r}")
    for q, a in r["think_off"]["samples"][:1]:
        lines.append(f"- reasoning, thinking off 👶 {q!r} 🤖 {a!r}")
    for p, (a, _) in zip(lora_prompts, lora_samples):
        lines.append(f"- LoRA 👶 {p[-1]['content']!r} 🤖 {a!r}")
    lines += ["", f"Stage times (s, wall and CPU of the process): {json.dumps(times)}", "", "![loss curves](loss_curves.png)", ""]
    report = "\n".join(lines)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(report)
    plot_curves(out, os.path.join(out, "loss_curves.png"))
    print("\n" + report)
    print(f"report: {os.path.join(out, 'report.md')}, curves: {os.path.join(out, 'loss_curves.png')}")
    if not ok:
        raise SystemExit("a stage missed its bar (see above)")


if __name__ == "__main__":
    run_main(main)
