"""A user's mistakes, script by script: each row runs a real script on a copy of a folder of good files (tiny
trained weights, their configs, a resume file, a LoRA adapter, data of every stage) with one class of bad
input, and asserts what the user relies on: exactly one `error: ...` line on stderr naming the problem,
exit status 1, no traceback, and every file that was there before byte-identical afterwards (no temporary
file left behind either).

Most rows run in a child forked from a warm server (tests/script_runner.py) so they do not each pay ~5 s of
`import torch, transformers`; rows that need a whole process tree (torchrun) or a private mount (a full disk)
start a fresh one. A new script adds its rows to CASES: one per class of bad input it reads.
"""
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from conftest import ROOT, warm_runner
from script_runner import ENV, Result

TINY = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--device", "cpu"]
TINY_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TRAIN = [*TINY, "--num_workers", "0", "--out_dir", "{out}", "--max_seq_len", "64", "--batch_size", "2", "--max_steps", "2",
         "--log_interval", "1"]
EVAL = ["eval_model.py", "--out_dir", "{out}", "--dim", "64", "--n_layers", "2", "--device", "cpu", "--max_new_tokens", "4"]


# ----------------------------------------------------------------------------------------------------
# The folder of good files every row starts from
# ----------------------------------------------------------------------------------------------------
def conv(user, assistant):
    return {"conversations": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")


def tiny_model(seed):
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(**TINY_CONFIG))


@pytest.fixture(scope="module")
def runner():
    return warm_runner()


@pytest.fixture(scope="module")
def good(tmp_path_factory, runner):
    """data/ with a file per stage, out/ with every stage's weights + .json, a LoRA adapter, a resume file of an
    unfinished run (pretrain_64_resume.pth at step 1 of 3) and of a finished one (done_64_resume.pth)."""
    from model.model_lora import apply_lora, save_lora
    from trainer_utils import save_weights
    root = tmp_path_factory.mktemp("good")
    data, out = root / "data", root / "out"
    data.mkdir()
    out.mkdir()
    prose = "人民日报报道，今年我国经济持续稳定增长。 The quick brown fox jumps over the lazy dog. "
    write_jsonl(data / "pretrain.jsonl", [{"text": prose[i % 20:] + prose * 2} for i in range(32)])
    write_jsonl(data / "sft.jsonl", [conv(f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。") for a in range(4) for b in range(4)])
    write_jsonl(data / "dpo.jsonl", [{"chosen": [{"role": "user", "content": f"{a}加{a}？"}, {"role": "assistant", "content": f"{2 * a}。"}],
                                      "rejected": [{"role": "user", "content": f"{a}加{a}？"}, {"role": "assistant", "content": "不知道"}]}
                                     for a in range(16)])
    write_jsonl(data / "reason.jsonl", [conv(f"{a}+{a}=?", f"<think>\n{a}+{a}={2 * a}\n</think>\n<answer>\n{2 * a}\n</answer>")
                                        for a in range(16)])
    write_jsonl(data / "rlaif.jsonl", [{"conversations": [{"role": "user", "content": f"{a}加{a}等于几？"},
                                                          {"role": "assistant", "content": "空"}], "gt": str(2 * a)} for a in range(8)])
    # every 4th prompt is far longer than --max_seq_len 64: its reply is cut off entirely
    write_jsonl(data / "sft_long_prompts.jsonl", [conv(("很长的问题" * 30 if i % 4 == 0 else "") + f"{i}加{i}？", f"{2 * i}。")
                                                  for i in range(16)])
    for seed, stage in enumerate(["full_sft", "rlhf", "reason"]):
        save_weights(tiny_model(seed), str(out / f"{stage}_64.pth"))
    base = tiny_model(9)
    apply_lora(base, rank=4)
    (out / "lora").mkdir()
    save_lora(base, str(out / "lora" / "lora_identity_64.pth"))
    nan = tiny_model(5)
    with torch.no_grad():
        for p in nan.parameters():
            p.fill_(float("nan"))
    save_weights(nan, str(out / "nan_64.pth"))
    pretrain = ["train_pretrain.py", *TRAIN, "--data_path", "{data}/pretrain.jsonl", "--max_seq_len", "32"]
    for extra in (["--max_steps", "3", "--stop_at_step", "1"], ["--save_weight", "done"]):
        result = runner.run(pretrain[0], fill(pretrain[1:] + extra, root))
        assert result.returncode == 0, result.stderr[-3000:]
    shutil.rmtree(out / "logs")
    assert sorted(os.listdir(out)) == sorted(["full_sft_64.pth", "full_sft_64.json", "rlhf_64.pth", "rlhf_64.json", "reason_64.pth",
                                              "reason_64.json", "nan_64.pth", "nan_64.json", "lora", "pretrain_64.pth",
                                              "pretrain_64.json", "pretrain_64_resume.pth", "done_64.pth", "done_64.json",
                                              "done_64_resume.pth"])
    return root


def fill(args, root, out=None):
    return [a.format(out=out or root / "out", data=root / "data", root=root) for a in args]


def snapshot(folder):
    """{relative path: sha256} of every file under folder."""
    found = {}
    for d, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


# ----------------------------------------------------------------------------------------------------
# Ways to break a file of the good folder (setup functions: root -> None)
# ----------------------------------------------------------------------------------------------------
def write(rel, content):
    def setup(root):
        with open(root / rel, "wb" if isinstance(content, bytes) else "w", encoding=None if isinstance(content, bytes) else "utf-8") as f:
            f.write(content)
    return setup


def truncate(rel, keep=1000):
    def setup(root):
        with open(root / rel, "rb") as f:
            head = f.read(keep)
        write(rel, head)(root)
    return setup


def edit_json(rel, **changes):
    def setup(root):
        with open(root / rel, encoding="utf-8") as f:
            cfg = json.load(f)
        write(rel, json.dumps({**cfg, **changes}))(root)
    return setup


def torch_file(rel, obj):
    return lambda root: torch.save(obj, root / rel)


def copy(src, dst):
    return lambda root: shutil.copyfile(root / src, root / dst)


def remove(rel):
    return lambda root: os.remove(root / rel)


def jsonl_file(rel, lines):
    return lambda root: write_jsonl(root / rel, lines)


def hf_folder(config_text):
    """A transformers-style folder whose config.json holds config_text."""
    def setup(root):
        (root / "hf").mkdir()
        write("hf/config.json", config_text)(root)
    return setup


# ----------------------------------------------------------------------------------------------------
# The table: one row per script and class of bad input
# ----------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    argv: list  # script, then its flags; {out}, {data} and {root} are filled in
    needles: tuple = ()  # what the error line must say
    setup: Callable = None
    stdin: bytes = b""
    launch: str = "warm"  # warm | ranks / torchrun (2 gloo processes) | tmpfs (out_dir on a full file system) | permissions
    fsize: int = None  # a file size limit (bytes) for the run: writes past it fail
    chmod: tuple = ()  # (path, mode) pairs applied for the run only
    marks: list = field(default_factory=list)


def train(script, data, *flags):
    return [script, *TRAIN, "--data_path", "{data}/" + data, *flags]


SFT = lambda *f: train("train_full_sft.py", "sft.jsonl", "--from_weight", "rlhf", *f)  # noqa: E731
DPO = lambda *f: train("train_dpo.py", "dpo.jsonl", *f)  # noqa: E731
LORA = lambda *f: train("train_lora.py", "sft.jsonl", *f)  # noqa: E731
REASON = lambda *f: train("train_distill_reason.py", "reason.jsonl", *f)  # noqa: E731
PRETRAIN = lambda *f: train("train_pretrain.py", "pretrain.jsonl", *f)  # noqa: E731
GRPO = lambda *f: train("train_grpo.py", "rlaif.jsonl", "--num_generations", "2", "--max_new_tokens", "4", *f)  # noqa: E731
PPO = lambda *f: train("train_ppo.py", "rlaif.jsonl", "--max_new_tokens", "4", "--mini_batch_size", "2", *f)  # noqa: E731
SMALL = 400_000  # below every weight file (~2 MB) and above every log line

CASES = [
    # ---- a numeric flag out of its range, in every script (refused while parsing)
    Case("pretrain-batch-size-0", PRETRAIN("--batch_size", "0"), ("--batch_size", "positive integer")),
    Case("pretrain-batch-size-text", PRETRAIN("--batch_size", "big"), ("--batch_size", "expected an integer")),
    Case("sft-epochs-0", SFT("--epochs", "0"), ("--epochs", "positive integer")),
    Case("sft-learning-rate-negative", SFT("--learning_rate", "-1"), ("--learning_rate", "> 0")),
    Case("sft-learning-rate-nan", SFT("--learning_rate", "nan"), ("--learning_rate", "finite")),
    Case("dpo-accumulation-0", DPO("--accumulation_steps", "0"), ("--accumulation_steps",)),
    Case("dpo-beta-0", DPO("--beta", "0"), ("--beta", "> 0")),
    Case("lora-rank-0", LORA("--lora_rank", "0"), ("--lora_rank",)),
    Case("lora-name-with-folder", LORA("--lora_name", "../x"), ("--lora_name", "plain name")),
    Case("reason-special-weight-negative", REASON("--special_token_weight", "-1"), ("--special_token_weight", ">= 0")),
    Case("pretrain-log-interval-0", PRETRAIN("--log_interval", "0"), ("--log_interval",)),
    Case("pretrain-save-interval-0", PRETRAIN("--save_interval", "0"), ("--save_interval",)),
    Case("pretrain-seed-negative", PRETRAIN("--seed", "-1"), ("--seed", "from 0 to")),
    Case("pretrain-dropout-1", PRETRAIN("--dropout", "1"), ("--dropout", "[0, 1)")),
    Case("pretrain-grad-clip-negative", PRETRAIN("--grad_clip", "-1"), ("--grad_clip",)),
    Case("pretrain-device-unknown", PRETRAIN("--device", "gpu"), ("--device", "gpu")),
    Case("pretrain-save-weight-path", PRETRAIN("--save_weight", "a/b"), ("--save_weight",)),
    Case("eval-temperature-negative", EVAL + ["--temperature", "-1"], ("--temperature",)),
    Case("eval-top-p-0", EVAL + ["--top_p", "0"], ("--top_p", "(0, 1]")),
    Case("eval-max-new-tokens-0", EVAL + ["--max_new_tokens", "0"], ("--max_new_tokens",)),
    Case("eval-history-negative", EVAL + ["--history_cnt", "-2"], ("--history_cnt",)),
    Case("eval-model-path-without-load", EVAL + ["--model_path", "{root}/hf"], ("--model_path", "--load 1")),  # would be ignored
    Case("serve-port-out-of-range", ["scripts/serve_openai_api.py", "--port", "70000"], ("--port", "65535")),
    Case("serve-max-seq-len-1", ["scripts/serve_openai_api.py", "--max_seq_len", "1"], ("--max_seq_len",)),
    Case("serve-top-p-2", ["scripts/serve_openai_api.py", "--top_p", "2"], ("--top_p",)),
    Case("convert-dim-0", ["scripts/convert_model.py", "--dim", "0"], ("--dim",)),
    Case("tokenizer-vocab-too-small", ["train_tokenizer.py", "--data_path", "{data}/pretrain.jsonl", "--out_dir", "{out}/tok",
                                       "--vocab_size", "100"], ("--vocab_size", ">= 283")),
    Case("tokenizer-sample-rate-0", ["train_tokenizer.py", "--sample_rate", "0"], ("--sample_rate",)),
    Case("demo-data-negative-count", ["dataset/build_demo_data.py", "--out_dir", "{out}/demo", "--sft", "-1"], ("--sft",)),
    Case("bench-batch-size-0", ["scripts/bench_train.py", "--batch_size", "0"], ("--batch_size",)),
    Case("memory-check-items-0", ["scripts/check_dataset_memory.py", "--items", "0"], ("--items",)),
    Case("demo-device-unknown", ["scripts/demo.py", "--device", "tpu9"], ("--device",)),
    Case("grpo-one-generation", GRPO("--num_generations", "1"), ("--num_generations 1", "2 or more")),
    Case("grpo-top-p-0", GRPO("--top_p", "0"), ("--top_p",)),
    Case("grpo-temperature-0", GRPO("--temperature", "0"), ("--temperature", "> 0")),
    Case("grpo-epsilon-1", GRPO("--loss_type", "grpo", "--epsilon", "1"), ("--epsilon",)),
    Case("grpo-beta-negative", GRPO("--beta", "-0.1"), ("--beta", ">= 0")),
    Case("grpo-reward-unknown", GRPO("--rewards", "format,speed"), ("--rewards", "speed")),
    Case("grpo-reward-weights-count", GRPO("--reward_weights", "1,2,3"), ("--reward_weights",)),
    Case("grpo-length-window-reversed", GRPO("--rewards", "length", "--length_min", "50", "--length_max", "10"), ("--length_min",)),
    Case("grpo-compile", GRPO("--compile", "1"), ("--compile", "RL")),
    Case("ppo-gamma-2", PPO("--gamma", "2"), ("--gamma",)),
    Case("ppo-mini-batch-too-big", PPO("--mini_batch_size", "64"), ("--mini_batch_size",)),
    Case("ppo-accumulation", PPO("--accumulation_steps", "2"), ("--accumulation_steps",)),

    # ---- a file that is not there
    Case("pretrain-data-missing", train("train_pretrain.py", "nope.jsonl"), ("nope.jsonl", "not found")),
    Case("pretrain-data-is-a-folder", PRETRAIN("--data_path", "{data}"), ("data",)),
    Case("pretrain-tokenizer-missing", PRETRAIN("--tokenizer_path", "{root}/nope"), ("nope", "no tokenizer")),
    Case("reason-previous-stage-missing", REASON("--dim", "32"), ("rlhf_32.pth", "train_dpo.py")),
    Case("eval-lora-missing", EVAL + ["--model_mode", "2", "--lora_name", "lora_nope", "--prompt", "hi"], ("lora_nope_64.pth", "not found")),
    Case("eval-weight-name-missing", EVAL + ["--weight", "plain", "--prompt", "hi"],
         ("plain_64.pth not found: pass the --out_dir",)),  # a name no script writes: no "run ... first"
    Case("tokenizer-corpus-missing", ["train_tokenizer.py", "--data_path", "{data}/nope.jsonl", "--out_dir", "{out}/tok"], ("nope.jsonl",)),

    Case("grpo-previous-stage-missing", GRPO("--dim", "32"), ("reason_32.pth", "train_distill_reason.py")),
    Case("grpo-reward-model-missing", GRPO("--rewards", "model", "--reward_model_path", "{root}/nope"), ("--reward_model_path", "no such folder")),

    # ---- data of another stage
    Case("grpo-sft-data-has-no-answers", GRPO("--data_path", "{data}/sft.jsonl"), ("sft.jsonl:1", "no ground truth")),
    Case("grpo-dpo-data", GRPO("--data_path", "{data}/dpo.jsonl"), ("dpo.jsonl:1", "DPO")),
    Case("sft-on-rl-prompts", SFT("--data_path", "{data}/rlaif.jsonl"), ("rlaif.jsonl:1", "RL-prompt data", "train_grpo.py")),

    # ---- a run that would take no optimizer step, or whose weights took none
    Case("resume-finished-run", PRETRAIN("--save_weight", "done", "--resume", "1", "--max_seq_len", "32"),
         ("done_64_resume.pth", "already finished")),
    Case("resume-stop-before-resumed-step", PRETRAIN("--max_steps", "3", "--max_seq_len", "32", "--resume", "1", "--stop_at_step", "1"),
         ("--stop_at_step 1",)),
    Case("sft-every-step-non-finite", SFT("--from_weight", "{out}/nan_64.pth"), ("no optimizer step", "non-finite")),
    Case("grpo-every-step-non-finite", GRPO("--from_weight", "{out}/nan_64.pth"), ("nan_64.pth",)),
    Case("ppo-every-step-non-finite", PPO("--from_weight", "{out}/nan_64.pth"), ("nan_64.pth",)),

    # ---- no sample keeps a labelled token within --max_seq_len
    Case("sft-prompts-longer-than-window", SFT("--max_seq_len", "8"), ("nothing to learn", "--max_seq_len 8")),
    Case("dpo-prompts-longer-than-window", DPO("--max_seq_len", "8"), ("nothing to learn",)),
    Case("reason-prompts-longer-than-window", REASON("--max_seq_len", "6"), ("nothing to learn",)),
    Case("lora-prompts-longer-than-window", LORA("--max_seq_len", "6"), ("nothing to learn",)),
    Case("pretrain-window-of-one", PRETRAIN("--max_seq_len", "1"), ("--max_seq_len", ">= 2")),

    # ---- weight files and the config .json beside them
    Case("weight-empty", SFT(), ("rlhf_64.pth", "empty (0 bytes)"), setup=write("out/rlhf_64.pth", b"")),
    Case("weight-truncated", SFT(), ("rlhf_64.pth", "truncated"), setup=truncate("out/rlhf_64.pth")),
    Case("weight-not-torch", SFT(), ("rlhf_64.pth", "not a readable weight file"), setup=write("out/rlhf_64.pth", b"hello")),
    Case("weight-not-tensors", SFT(), ("rlhf_64.pth", "state dict of tensors"), setup=torch_file("out/rlhf_64.pth", {"a": 1})),
    Case("weight-is-folder", SFT("--from_weight", "{out}/dir.pth"), ("dir.pth", "folder"), setup=lambda root: (root / "out" / "dir.pth").mkdir()),
    Case("weight-not-pth", SFT("--from_weight", "{out}/rlhf_64.json"), ("rlhf_64.json", ".pth")),
    Case("config-not-json", SFT(), ("rlhf_64.json", "not valid JSON"), setup=write("out/rlhf_64.json", "{not json")),
    Case("config-empty", SFT(), ("rlhf_64.json", "empty"), setup=write("out/rlhf_64.json", "")),
    Case("config-not-utf8", SFT(), ("rlhf_64.json", "not UTF-8"), setup=write("out/rlhf_64.json", b"\xff\xfe{}")),
    Case("config-a-list", SFT(), ("rlhf_64.json", "JSON list"), setup=write("out/rlhf_64.json", "[1, 2]")),
    Case("config-wrong-type", SFT(), ("rlhf_64.json", "hidden_size", "integer"), setup=edit_json("out/rlhf_64.json", hidden_size="big")),
    Case("config-float-size", SFT(), ("rlhf_64.json", "hidden_size"), setup=edit_json("out/rlhf_64.json", hidden_size=64.5)),
    Case("config-negative-layers", SFT(), ("rlhf_64.json", "num_hidden_layers", "positive"),
         setup=edit_json("out/rlhf_64.json", num_hidden_layers=-2)),
    Case("config-null-eps", SFT(), ("rlhf_64.json", "rms_norm_eps"), setup=edit_json("out/rlhf_64.json", rms_norm_eps=None)),
    Case("config-of-another-model", SFT(), ("rlhf_64.json", "belongs to another model"),
         setup=edit_json("out/rlhf_64.json", hidden_size=128)),
    Case("plain-weight-other-flags", SFT("--n_layers", "3"), ("check --dim/--n_layers",), setup=remove("out/rlhf_64.json")),
    Case("eval-weight-empty", EVAL + ["--model_mode", "1", "--prompt", "hi"], ("full_sft_64.pth", "empty"),
         setup=write("out/full_sft_64.pth", b"")),
    Case("eval-config-not-json", EVAL + ["--model_mode", "2", "--prompt", "hi"], ("rlhf_64.json", "not valid JSON"),
         setup=write("out/rlhf_64.json", "nope")),
    Case("serve-weight-truncated", ["scripts/serve_openai_api.py", "--weight", "{out}/reason_64.pth", "--device", "cpu"],
         ("reason_64.pth", "truncated"), setup=truncate("out/reason_64.pth")),
    Case("convert-weight-empty", ["scripts/convert_model.py", "--weight", "{out}/reason_64.pth", "--save_dir", "{root}/hf_out"],
         ("reason_64.pth", "empty"), setup=write("out/reason_64.pth", b"")),
    Case("convert-hf-config-not-json", ["scripts/convert_model.py", "--to_native", "1", "--model_path", "{root}/hf",
                                        "--weight", "{out}/back.pth"], ("config.json", "not valid JSON"), setup=hf_folder("{oops")),
    Case("tokenizer-files-damaged", PRETRAIN("--tokenizer_path", "{root}/tok"), ("cannot load the tokenizer",),
         setup=lambda root: (shutil.copytree(os.path.join(ROOT, "model"), root / "tok", ignore=shutil.ignore_patterns("*.py")),
                             truncate("tok/tokenizer.json", 5000)(root))),

    # ---- resume files
    Case("resume-empty", PRETRAIN("--max_steps", "3", "--max_seq_len", "32", "--resume", "1"), ("pretrain_64_resume.pth", "empty"),
         setup=write("out/pretrain_64_resume.pth", b"")),
    Case("resume-truncated", PRETRAIN("--max_steps", "3", "--max_seq_len", "32", "--resume", "1"), ("pretrain_64_resume.pth", "truncated"),
         setup=truncate("out/pretrain_64_resume.pth", 50_000)),
    Case("resume-is-a-weight-file", PRETRAIN("--max_steps", "3", "--max_seq_len", "32", "--resume", "1"),
         ("pretrain_64_resume.pth", "not a resume file"), setup=copy("out/pretrain_64.pth", "out/pretrain_64_resume.pth")),
    Case("resume-other-settings", PRETRAIN("--max_steps", "3", "--max_seq_len", "32", "--resume", "1", "--batch_size", "4"),
         ("batch_size 2 -> 4",)),
    Case("resume-other-model", PRETRAIN("--max_steps", "3", "--max_seq_len", "32", "--resume", "1", "--dim", "32"),
         ("pretrain_32_resume.pth", "does not fit this run"), setup=copy("out/pretrain_64_resume.pth", "out/pretrain_32_resume.pth")),

    # ---- LoRA adapters
    Case("eval-lora-empty", EVAL + ["--model_mode", "2", "--lora_name", "lora_identity", "--prompt", "hi"],
         ("lora_identity_64.pth", "empty"), setup=write("out/lora/lora_identity_64.pth", b"")),
    Case("eval-lora-truncated", EVAL + ["--model_mode", "2", "--lora_name", "lora_identity", "--prompt", "hi"],
         ("lora_identity_64.pth", "truncated"), setup=truncate("out/lora/lora_identity_64.pth", 500)),
    Case("eval-lora-bad-meta", EVAL + ["--model_mode", "2", "--lora_name", "lora_identity", "--prompt", "hi"],
         ("lora_identity_64.pth", "rank/alpha/targets"),
         setup=torch_file("out/lora/lora_identity_64.pth", {"lora": {}, "meta": {"rank": "x", "alpha": 1, "targets": ["q_proj"]}})),
    Case("eval-lora-is-weights", EVAL + ["--model_mode", "2", "--lora_name", "lora_identity", "--prompt", "hi"],
         ("lora_identity_64.pth", "not a LoRA file"), setup=copy("out/rlhf_64.pth", "out/lora/lora_identity_64.pth")),
    Case("convert-lora-truncated", ["scripts/convert_model.py", "--weight", "{out}/rlhf_64.pth", "--lora_path",
                                    "{out}/lora/lora_identity_64.pth", "--save_dir", "{root}/hf_out"],
         ("lora_identity_64.pth", "truncated"), setup=truncate("out/lora/lora_identity_64.pth", 500)),

    # ---- bad data lines (the messages must not mislead)
    Case("dpo-line-without-rejected", train("train_dpo.py", "bad.jsonl"), ('bad.jsonl:2', 'no "rejected" key'),
         setup=jsonl_file("data/bad.jsonl", [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                                  "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]},
                                                 {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])),
    Case("pretrain-unterminated-string", train("train_pretrain.py", "bad.jsonl"), ("bad.jsonl:2", "starting at column"),
         setup=write("data/bad.jsonl", '{"text": "ok"}\n{"text": "abc')),  # the last line, no newline after it
    Case("sft-lone-surrogate", train("train_full_sft.py", "bad.jsonl", "--from_weight", "rlhf"), ("bad.jsonl:1", "surrogate"),
         setup=jsonl_file("data/bad.jsonl", ['{"conversations": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "b"}]}'])),
    Case("tokenizer-corpus-lone-surrogate", ["train_tokenizer.py", "--data_path", "{data}/bad.jsonl", "--out_dir", "{out}/tok"],
         ("bad.jsonl:1",), setup=jsonl_file("data/bad.jsonl", ['{"text": "\\udc00"}'])),

    # ---- input typed or piped into eval_model.py
    Case("eval-stdin-not-utf8", EVAL + ["--model_mode", "1"], ("stdin line 2", "not UTF-8"), stdin=b"1\n\xff\xfe\n"),
    Case("eval-prompt-not-utf8", EVAL + ["--model_mode", "1", "--prompt", os.fsdecode(b"\xff")], ("--prompt", "not UTF-8")),

    # ---- a save that fails: the previous file stays as it was
    Case("sft-save-file-size-limit", SFT(), ("full_sft_64.pth", "file size limit"), fsize=SMALL),
    Case("lora-save-file-size-limit", LORA("--lora_name", "lora_identity", "--lora_rank", "128"), ("lora_identity_64.pth", "file size limit"),
         fsize=300_000),
    Case("tokenizer-save-file-size-limit", ["train_tokenizer.py", "--data_path", "{data}/pretrain.jsonl", "--out_dir", "{out}/tok",
                                            "--vocab_size", "300"], ("tokenizer.json", "file size limit"), fsize=4000,
         setup=lambda root: shutil.copytree(os.path.join(ROOT, "model"), root / "out" / "tok", ignore=shutil.ignore_patterns("*.py"))),
    Case("sft-out-dir-is-a-file", SFT("--from_weight", "{out}/rlhf_64.pth", "--out_dir", "{data}/sft.jsonl/sub"), ("--out_dir", "not writable")),
    Case("sft-save-disk-full", SFT(), ("full_sft_64.pth", "no space left"), launch="tmpfs"),
    Case("sft-out-dir-read-only", SFT(), ("--out_dir", "not writable"), chmod=(("out", 0o555),), launch="permissions"),
    Case("weight-unreadable", SFT(), ("rlhf_64.pth", "Permission denied"), chmod=(("out/rlhf_64.pth", 0o000),), launch="permissions"),

    # ---- under torchrun: printed once (rank 0), every rank exits 1 by itself. "ranks" starts the two processes
    # with the environment torchrun gives them, so each one's own exit status and stderr can be checked.
    Case("ranks-bad-data", train("train_pretrain.py", "sft.jsonl"), ("sft.jsonl:1", "looks like SFT"), launch="ranks"),
    Case("ranks-save-fails-on-rank-0-only", SFT(), ("full_sft_64.pth", "file size limit"), launch="ranks", fsize=SMALL),
    Case("ranks-bad-flag", PRETRAIN("--batch_size", "0"), ("--batch_size",), launch="ranks"),
    Case("torchrun-save-fails-on-rank-0-only", SFT(), ("full_sft_64.pth", "file size limit"), launch="torchrun", fsize=SMALL),
]


# ----------------------------------------------------------------------------------------------------
# Running a row
# ----------------------------------------------------------------------------------------------------
def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def file_size_limit(fsize):
    def limit():  # in the child, before exec: writes past fsize bytes fail with EFBIG
        if fsize is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return limit


def run_torchrun(argv, fsize):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                           os.path.join(ROOT, argv[0]), *argv[1:]], cwd=ROOT, env={**os.environ, **ENV},
                          capture_output=True, text=True, timeout=900, preexec_fn=file_size_limit(fsize))
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_two_ranks(argv, fsize):
    """Two processes of a gloo group, started with the variables torchrun sets. Returns a Result per rank."""
    common = {**os.environ, **ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
              "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0", "ROLE_RANK": "0", "ROLE_WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], cwd=ROOT,
                              env={**common, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, preexec_fn=file_size_limit(fsize)) for r in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        results.append(Result(p.returncode, out, err))
    return results


def run_obeying_permissions(argv):
    """A fresh process for which file permissions count: as root, one without the capabilities that let root
    read and write any file (setpriv drops them from the bounding set before exec)."""
    cmd = [sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without `setpriv`: root reads and writes whatever the permissions say")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=900)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_on_full_disk(argv, root):
    """Run with --out_dir on a private tmpfs just big enough for the files already in out/: the save has no
    room. Needs unprivileged user + mount namespaces (`unshare -Urm`); the files are copied back out after."""
    if shutil.which("unshare") is None:
        pytest.skip("no `unshare` here: cannot give the run a full file system without root")
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {root}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"user and mount namespaces are not available ({probe.stderr.decode().strip()}): cannot mount a small tmpfs")
    used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root / "out") for f in fs)
    mnt, after = root / "mnt", root / "after"
    mnt.mkdir()
    after.mkdir()
    argv = [a.replace(str(root / "out"), str(mnt)) for a in argv]
    script = (f'mount -t tmpfs -o size={used // 1024 + 160}k tmpfs "{mnt}" && cp -a "{root}/out/." "{mnt}/" || exit 99\n'
              f'"{sys.executable}" "{os.path.join(ROOT, argv[0])}" {" ".join(shlex.quote(a) for a in argv[1:])}\n'
              f'rc=$?; cp -a "{mnt}/." "{after}/"; exit $rc')
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=ROOT, env={**os.environ, **ENV},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode != 99, proc.stderr
    return Result(proc.returncode, proc.stdout, proc.stderr), after


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(case, good, runner, tmp_path):
    root = tmp_path / "case"
    shutil.copytree(good, root)
    if case.setup:
        case.setup(root)
    before = snapshot(root)
    argv = fill(case.argv, root)
    after_dir = root
    modes = [(root / rel, os.stat(root / rel).st_mode) for rel, _ in case.chmod]
    for rel, mode in case.chmod:
        os.chmod(root / rel, mode)
    if case.launch == "warm":
        result = runner.run(argv[0], argv[1:], stdin=case.stdin, fsize=case.fsize)
    elif case.launch == "torchrun":
        result = run_torchrun(argv, case.fsize)
    elif case.launch == "permissions":
        result = run_obeying_permissions(argv)
    elif case.launch == "ranks":
        ranks = run_two_ranks(argv, case.fsize)
        assert [r.returncode for r in ranks] == [1, 1], [r.stderr[-2000:] for r in ranks]
        assert all("Traceback" not in r.stderr for r in ranks), [r.stderr[-2000:] for r in ranks]
        assert not [line for line in ranks[1].stderr.splitlines() if line.startswith("error:")], ranks[1].stderr
        result = ranks[0]
    else:
        result, out_after = run_on_full_disk(argv, root)
        before = {k[len("out/"):]: v for k, v in before.items() if k.startswith("out/")}
        after_dir = out_after
    for path, mode in modes:
        os.chmod(path, mode)

    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in case.needles:
        assert needle in errors[0], errors[0]
    if case.launch == "torchrun":  # torchrun prints its own report (with its own traceback) after our line
        assert f'File "{ROOT}' not in result.stderr, result.stderr[-3000:]  # no traceback from any rank
        # (each rank's own exit status is checked by the "ranks" rows: torchrun may stop the slower rank itself)
    else:
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
    after = snapshot(after_dir)
    for path, digest in before.items():
        assert after.get(path) == digest, f"{path} changed or vanished"
    assert not [p for p in after if ".tmp" in os.path.basename(p)], sorted(after)


# ----------------------------------------------------------------------------------------------------
# The other side of some rows: what still works, and says what it did
# ----------------------------------------------------------------------------------------------------
def test_some_prompts_longer_than_the_window_are_named_and_counted(good, runner, tmp_path):
    """4 of the 16 samples lose their whole reply to --max_seq_len: the run trains on the others and says so,
    naming the first such line, before training and again at the end."""
    root = tmp_path / "case"
    shutil.copytree(good, root)
    argv = fill(train("train_full_sft.py", "sft_long_prompts.jsonl", "--from_weight", "rlhf", "--epochs", "1", "--max_steps", "0",
                      "--batch_size", "4"), root)
    result = runner.run(argv[0], argv[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("warning: 4 of the 16 samples have no labelled token within --max_seq_len 64, their prompts fill it "
            f"(first: {root}/data/sft_long_prompts.jsonl:1); they add nothing to the loss") in result.stdout
    assert "note: 4 sample(s) read (each epoch counts) had no labelled token within --max_seq_len 64" in result.stdout
    assert os.path.exists(root / "out" / "full_sft_64.pth")


def test_skip_bad_lines_skips_and_counts_samples_with_nothing_to_learn(good, runner, tmp_path):
    """4 of the 16 samples have prompts longer than --max_seq_len. With --skip_bad_lines they are counted and
    never trained on: with --batch_size 1 each of them is a step without a label, skipped (no optimizer step,
    so AdamW's momentum and weight decay do not move the weights either)."""
    root = tmp_path / "case"
    shutil.copytree(good, root)
    argv = fill(train("train_full_sft.py", "sft_long_prompts.jsonl", "--from_weight", "rlhf", "--skip_bad_lines", "1",
                      "--batch_size", "1", "--epochs", "1", "--max_steps", "0"), root)
    result = runner.run(argv[0], argv[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: 4 of the 16 samples have no labelled token within --max_seq_len 64" in result.stdout
    assert "they are skipped and counted (--skip_bad_lines)" in result.stdout
    assert "note: 4 sample(s) read (each epoch counts) had no labelled token" in result.stdout
    log = [json.loads(line) for line in open(root / "out" / "logs" / "full_sft_64.jsonl", encoding="utf-8")]
    assert len(log) == 16 and log[-1]["unlabelled_steps"] == 4
    skipped_before = 0
    for record in log:  # one record per step: a skipped step is exactly one whose loss had no token to count
        skipped = record.get("unlabelled_steps", 0)
        assert (record["loss"] == 0) == (skipped > skipped_before), record
        skipped_before = skipped


def test_a_batch_keeps_only_samples_with_something_to_learn_when_skipping():
    from dataset.lm_dataset import make_collate
    from trainer_utils import counting_collate
    good_sample = (torch.tensor([1, 2, 3]), torch.tensor([-100, 2, 3]))
    empty = (torch.tensor([1, 2, 3, 4]), torch.tensor([-100, -100, -100, -100]))
    (ids, labels), n = counting_collate(make_collate(0), skip=True)([empty, good_sample, empty])
    assert n == 2 and ids.tolist() == [[1, 2, 3]] and labels.tolist() == [[-100, 2, 3]]
    (ids, _), n = counting_collate(make_collate(0), skip=False)([empty, good_sample])
    assert n == 1 and ids.shape[0] == 2  # counted, kept: it adds nothing to the token-mean loss
    (ids, _), n = counting_collate(make_collate(0), skip=True)([empty, empty])
    assert n == 2 and ids.shape[0] == 2  # never an empty batch: the training loop skips the step instead
    dpo = {"chosen_input_ids": torch.tensor([1, 2]), "chosen_labels": torch.tensor([-100, 2]),
           "rejected_input_ids": torch.tensor([1, 2]), "rejected_labels": torch.tensor([-100, -100])}
    _, n = counting_collate(make_collate(0), skip=False)([dpo])
    assert n == 1  # a pair is learnable only if both sides are


def test_skip_summary_does_not_ask_for_the_flag_that_was_passed(tmp_path, capsys):
    from dataset.lm_dataset import PretrainDataset, load_tokenizer
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "good"}\n{"nope": 1}\n{"text": "also good"}\n', encoding="utf-8")
    PretrainDataset(str(path), load_tokenizer(os.path.join(ROOT, "model")), skip_bad_lines=True)
    err = capsys.readouterr().err
    assert "skipped 1 bad line(s) (--skip_bad_lines)" in err and "p.jsonl:2" in err
    assert "pass --skip_bad_lines" not in err


def test_typed_invalid_utf8_is_one_line_and_the_chat_goes_on(good, tmp_path):
    """On a terminal: bytes that are not UTF-8 get one `error:` line and the prompt again; the next line is
    answered and Ctrl-D ends the session with status 0."""
    import pty
    import select
    import time
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, *fill(EVAL, good), "--model_mode", "1"], stdin=slave, stdout=slave, stderr=slave,
                            cwd=ROOT, env={**os.environ, **ENV}, close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(marker, count=1):
        nonlocal seen
        while seen.count(marker) < count and proc.poll() is None:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
    try:
        read_until(b"[1] manual input")
        os.write(master, b"1\n")
        read_until("👶: ".encode())
        os.write(master, b"\xff\xfe\n")
        read_until("👶: ".encode(), 2)
        os.write(master, b"hello\n")
        read_until("🤖️: ".encode())
        read_until("👶: ".encode(), 3)
        time.sleep(0.5)  # let it block in input() before the end-of-file arrives
        os.write(master, b"\x04")
        read_until(b"\n", seen.count(b"\n") + 1)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    assert text.count("error:") == 1 and "that line is not UTF-8 text (byte 0xff" in text, text
    assert "Traceback" not in text and "🤖️: " in text
