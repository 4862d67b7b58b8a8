"""train_distillation.py: the loss (by hand, at its limits, masked to the assistant's tokens, chunked), the
frozen teacher, one-line errors, 2-process gloo DDP and resume."""
import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from test_train import assert_one_line_error, conv, read_log, run, write_jsonl

STUDENT = ["--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2"]
COMMON = [*STUDENT, "--device", "cpu", "--num_workers", "0", "--log_interval", "1", "--max_seq_len", "64",
          "--learning_rate", "1e-3", "--epochs", "1"]
KD = [*COMMON, "--teacher_dim", "64"]  # the teacher: full_sft_64.pth, its size from full_sft_64.json


def tiny(dim, seed, **kw):
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(hidden_size=dim, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, initializer_range=0.1, **kw))


@pytest.fixture(scope="module")
def tok():
    from dataset.lm_dataset import load_tokenizer
    return load_tokenizer(os.path.join(ROOT, "model"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Chat data with system prompts and a multi-turn line, a student start (dim 32) and a teacher (dim 64)."""
    from trainer_utils import save_weights
    d = tmp_path_factory.mktemp("distill")
    rows = [conv(f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。", system="你是一个乐于助人的助手。" if a % 2 else None)
            for a in range(8) for b in range(4)]
    rows[1]["conversations"] += [{"role": "user", "content": "再说一遍？"}, {"role": "assistant", "content": "好的，答案不变。"}]
    sft = write_jsonl(d / "sft.jsonl", rows)
    # every reply the same number of tokens: a 2 x 2 batch then averages exactly as one batch of 4
    same_length = write_jsonl(d / "same_length.jsonl", [conv(f"{a}加{b}等于多少？", f"答案是{(a + b) % 10}。") for a in range(8) for b in range(4)])
    start = d / "start"
    start.mkdir()
    save_weights(tiny(32, seed=1), str(start / "full_sft_32.pth"))
    save_weights(tiny(64, seed=2), str(start / "full_sft_64.pth"))
    return {"sft": sft, "same_length": same_length, "start": str(start)}


def fresh_out(files, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(files["start"], out)
    return out


def sft_batch(tok, path, n=4, packed=False):
    from dataset.lm_dataset import SFTDataset, make_collate, make_pack_collate
    ds = SFTDataset(path, tok, max_length=64)
    samples = [ds[i] for i in range(n)]
    return make_pack_collate(64)(samples) if packed else make_collate(0)(samples)


# ----------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------
def test_loss_matches_a_hand_computed_case_at_temperature_two():
    from train_distillation import distillation_loss
    student = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
    teacher = [[3.0, 2.0, 1.0], [2.0, 0.0, -2.0]]
    T = 2.0

    def softmax(xs):
        e = [math.exp(x / T) for x in xs]
        return [v / sum(e) for v in e]
    kl = [sum(p * math.log(p / q) for p, q in zip(softmax(t), softmax(s))) for s, t in zip(student, teacher)]
    expected = T ** 2 * sum(kl) / 2
    # row 1: p = softmax(1.5, 1, 0.5) = (0.5065, 0.3072, 0.1863) and q is p reversed, so log(p/q) = (1, 0, -1)
    # and KL = 0.5065 - 0.1863 = 0.3202; row 2: p = softmax(1, 0, -1) = (0.6652, 0.2447, 0.0900), q uniform,
    # KL = sum p log p + log 3 = 0.2662. Loss = T^2 x mean = 4 x (0.3202 + 0.2662) / 2 = 1.1728.
    assert abs(expected - 1.1728) < 1e-4
    got = distillation_loss(torch.tensor(student), torch.tensor(teacher), T)
    assert abs(got.item() - expected) < 1e-6


def test_alpha_one_is_exactly_the_plain_sft_loss(tok, files):
    import train_full_sft
    from train_distillation import distill_batch_loss
    student, teacher = tiny(32, seed=1), tiny(64, seed=2).eval().requires_grad_(False)
    for packed in (False, True):
        batch = sft_batch(tok, files["sft"], n=6, packed=packed)
        sft_loss, _ = train_full_sft.loss_fn(student, batch)
        loss, parts = distill_batch_loss(student, batch, teacher, alpha=1.0, temperature=2.0)
        assert torch.equal(loss, sft_loss)
        assert parts["kd"].item() > 0  # the teacher part is there, it just weighs 0


def test_kl_is_zero_when_student_is_teacher(tok, files):
    from train_distillation import distill_batch_loss
    student = tiny(32, seed=1)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    loss, parts = distill_batch_loss(student, sft_batch(tok, files["sft"]), teacher, alpha=0.0, temperature=1.5)
    assert abs(parts["kd"].item()) < 1e-7 and abs(loss.item()) < 1e-7
    loss.backward()
    assert max(p.grad.abs().max().item() for p in student.parameters()) < 1e-6
    assert parts["ce"].item() > 1.0  # the labels would still have taught something


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_only_assistant_positions_contribute(tok, files, alpha):
    """Gradient reaches the student's logits only where SFT takes its loss (assistant content and its
    <|im_end|>), never at system/user/template or padding positions, and the loss is the masked mean."""
    from train_distillation import distill_batch_loss
    student, teacher = tiny(32, seed=1), tiny(64, seed=2).eval().requires_grad_(False)
    input_ids, labels = sft_batch(tok, files["sft"], n=4)  # rows 1 (multi-turn, system) and 3 (system) differ in length
    kept = {}

    def keep_logits(module, inputs, logits):
        logits.retain_grad()
        kept["logits"] = logits
    student.lm_head.register_forward_hook(keep_logits)
    T = 2.0
    loss, parts = distill_batch_loss(student, (input_ids, labels), teacher, alpha=alpha, temperature=T)
    loss.backward()
    grad = kept["logits"].grad
    where = F.pad(labels[:, 1:], (0, 1), value=-100) != -100
    assert (grad[~where] == 0).all()
    assert (grad[where].abs().sum(-1) > 0).all()
    assert 0 < int(where.sum()) < int((input_ids != 0).sum()) / 2  # prompts and templates are most of the tokens
    # the KD part is the KL over exactly those positions, computed plainly over the full logits
    with torch.no_grad():
        log_q = F.log_softmax(kept["logits"] / T, dim=-1)[where]
        log_p = F.log_softmax(teacher(input_ids).logits / T, dim=-1)[where]
        plain = T ** 2 * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    assert abs(parts["kd"].item() - plain.item()) < 1e-5


def test_chunked_kl_equals_whole_and_keeps_one_chunk_of_log_probs():
    """The KL runs chunk by chunk and is recomputed in backward: nothing of full-batch, full-vocabulary size in
    fp32 is kept for the backward pass, and the result is the unchunked one."""
    from train_distillation import distillation_loss
    torch.manual_seed(0)
    s = torch.randn(50, 300, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(50, 300, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append((x.shape, x.dtype)) or x, lambda x: x):
        chunked = distillation_loss(s, t, 1.5, chunk_rows=16)
    assert saved and all(shape[0] <= 16 and dtype == torch.bfloat16 for shape, dtype in saved), saved
    (g_chunked,) = torch.autograd.grad(chunked, s)
    whole = distillation_loss(s, t, 1.5, chunk_rows=1000)
    (g_whole,) = torch.autograd.grad(whole, s)
    assert abs(chunked.item() - whole.item()) < 1e-5
    assert torch.allclose(g_chunked.float(), g_whole.float(), atol=1e-3)
    assert distillation_loss(s[:0], t[:0], 1.5).item() == 0  # no labelled position: 0, not NaN


@pytest.mark.parametrize("use_moe", [False, True])
def test_teacher_logits_at_labelled_positions_are_its_forward_logits(tok, files, use_moe):
    """The teacher runs its head only where the loss looks; that is its full forward pass there (dense and MoE,
    padded and packed)."""
    from train_distillation import labelled_positions, teacher_logits_at
    teacher = tiny(64, seed=3, use_moe=use_moe).eval()
    for packed in (False, True):
        batch = sft_batch(tok, files["sft"], n=4, packed=packed)
        position_ids = batch[2] if packed else None
        where = labelled_positions(batch[1])
        full = teacher(batch[0], position_ids=position_ids, packed=packed).logits
        assert torch.allclose(teacher_logits_at(teacher, batch[0], position_ids, where), full[where], atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------------
def test_help_lists_the_distillation_flags():
    out = run("train_distillation.py", "--help").stdout
    for flag in ["--teacher_weight", "--teacher_dim", "--teacher_n_layers", "--teacher_use_moe", "--alpha", "--temperature",
                 "--from_weight", "--dim", "--use_moe", "--packing", "--resume", "--out_dir", "--use_wandb"]:
        assert flag in out, flag


def test_training_leaves_the_teacher_unchanged_and_logs_both_parts(files, tmp_path, monkeypatch):
    import train_distillation
    from trainer_utils import load_weights
    out = fresh_out(files, tmp_path)
    teacher_file = open(f"{out}/full_sft_64.pth", "rb").read()
    used = {}

    def load_and_keep(args, ctx):
        used["teacher"], path = real_load_teacher(args, ctx)
        return used["teacher"], path
    real_load_teacher = train_distillation.load_teacher
    monkeypatch.setattr(train_distillation, "load_teacher", load_and_keep)
    monkeypatch.setattr(sys, "argv", ["train_distillation.py", *KD, "--out_dir", out, "--data_path", files["sft"],
                                      "--batch_size", "4", "--max_steps", "5", "--alpha", "0.3", "--temperature", "2"])
    train_distillation.main()

    on_disk = load_weights(f"{out}/full_sft_64.pth").state_dict()
    assert all(torch.equal(v, on_disk[k]) for k, v in used["teacher"].state_dict().items())
    assert all(p.grad is None for p in used["teacher"].parameters())
    assert open(f"{out}/full_sft_64.pth", "rb").read() == teacher_file
    start, student = load_weights(f"{out}/full_sft_32.pth").state_dict(), load_weights(f"{out}/full_dist_32.pth").state_dict()
    assert not torch.equal(start["model.layers.0.mlp.up_proj.weight"], student["model.layers.0.mlp.up_proj.weight"])
    log = read_log(out, "full_dist_32.jsonl")
    assert len(log) == 5
    for r in log:
        assert abs(r["loss"] - (0.3 * r["ce"] + 0.7 * r["kd"])) < 1e-4, r
    assert log[-1]["kd"] < log[0]["kd"]


def test_minimind3_flag_names_train_the_same_student(files, tmp_path):
    """MiniMind-3's train_distillation.py spelling of the same run: the same student, bit for bit."""
    rest = ["--n_heads", "4", "--n_kv_heads", "2", "--device", "cpu", "--num_workers", "0", "--log_interval", "1",
            "--max_seq_len", "64", "--learning_rate", "1e-3", "--data_path", files["sft"], "--batch_size", "4", "--max_steps", "3"]
    ours, theirs = fresh_out(files, tmp_path / "ours"), fresh_out(files, tmp_path / "theirs")
    run("train_distillation.py", *rest, "--dim", "32", "--n_layers", "2", "--from_weight", "full_sft", "--teacher_weight", "full_sft",
        "--teacher_dim", "64", "--teacher_n_layers", "2", "--out_dir", ours)
    run("train_distillation.py", *rest, "--student_hidden_size", "32", "--student_num_layers", "2", "--student_use_moe", "0",
        "--from_student_weight", "full_sft", "--from_teacher_weight", "full_sft", "--teacher_hidden_size", "64",
        "--teacher_num_layers", "2", "--teacher_use_moe", "0", "--save_dir", theirs, "--from_resume", "0", "--use_compile", "0")
    a = torch.load(f"{ours}/full_dist_32.pth", weights_only=True)
    b = torch.load(f"{theirs}/full_dist_32.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_alpha_one_trains_exactly_like_train_full_sft(files, tmp_path):
    flags = [*COMMON, "--data_path", files["sft"], "--batch_size", "4", "--max_steps", "3", "--packing", "1"]
    out_sft, out_kd = fresh_out(files, tmp_path / "sft"), fresh_out(files, tmp_path / "kd")
    run("train_full_sft.py", *flags, "--out_dir", out_sft, "--from_weight", "full_sft", "--save_weight", "ce_only")
    run("train_distillation.py", *flags, "--teacher_dim", "64", "--out_dir", out_kd, "--alpha", "1")
    a = torch.load(f"{out_sft}/ce_only_32.pth", weights_only=True)
    b = torch.load(f"{out_kd}/full_dist_32.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_conversations_column_reads_a_corpus_that_names_it_otherwise(files, tmp_path):
    """The same lines under "messages", read with --conversations_column messages: the same student."""
    with open(files["sft"], encoding="utf-8") as f:
        rows = [{"messages": json.loads(line)["conversations"]} for line in f]
    renamed = write_jsonl(tmp_path / "messages.jsonl", rows)
    flags = [*KD, "--batch_size", "4", "--max_steps", "2"]
    out_a, out_b = fresh_out(files, tmp_path / "a"), fresh_out(files, tmp_path / "b")
    run("train_distillation.py", *flags, "--out_dir", out_a, "--data_path", files["sft"])
    run("train_distillation.py", *flags, "--out_dir", out_b, "--data_path", renamed, "--conversations_column", "messages")
    a = torch.load(f"{out_a}/full_dist_32.pth", weights_only=True)
    b = torch.load(f"{out_b}/full_dist_32.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_of_another_vocabulary_is_one_line_error(files, tmp_path):
    from trainer_utils import save_weights
    out = fresh_out(files, tmp_path)
    save_weights(tiny(64, seed=2, vocab_size=512), f"{out}/other_tokenizer.pth")
    proc = run("train_distillation.py", *KD, "--out_dir", out, "--data_path", files["sft"], "--batch_size", "4",
               "--teacher_weight", f"{out}/other_tokenizer.pth", check=False)
    assert_one_line_error(proc, "other_tokenizer.pth", "512-token vocabulary", "6400", "same tokenizer")


def test_missing_teacher_and_bad_flags_are_one_line_errors(files, tmp_path):
    out = fresh_out(files, tmp_path)
    base = [*KD, "--out_dir", out, "--data_path", files["sft"], "--batch_size", "4"]
    proc = run("train_distillation.py", *base, "--teacher_dim", "768", check=False)
    assert_one_line_error(proc, "full_sft_768.pth", "train_full_sft.py", "--teacher_weight")
    assert_one_line_error(run("train_distillation.py", *base, "--alpha", "1.5", check=False), "--alpha")
    assert_one_line_error(run("train_distillation.py", *base, "--temperature", "0", check=False), "--temperature")


def test_two_gloo_processes_equal_one_process(tok, files, tmp_path):
    """2 processes x batch 2 == 1 process x batch 4: same samples per step, same student, same logged parts.
    (Each process averages over its own labelled tokens, as in SFT; with equal-length replies that is the
    average of one process.)"""
    _, labels = sft_batch(tok, files["same_length"], n=32)
    assert len(set((labels != -100).sum(1).tolist())) == 1
    flags = [*KD, "--data_path", files["same_length"], "--accumulation_steps", "2", "--max_steps", "3", "--alpha", "0.5"]
    one, two = fresh_out(files, tmp_path / "one"), fresh_out(files, tmp_path / "two")
    run("train_distillation.py", *flags, "--batch_size", "4", "--out_dir", one)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29641",
                           os.path.join(ROOT, "train_distillation.py"), *flags, "--batch_size", "2", "--out_dir", two],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(f"{one}/full_dist_32.pth", weights_only=True)
    b = torch.load(f"{two}/full_dist_32.pth", weights_only=True)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k  # fp32 reduction order only
    la, lb = read_log(one, "full_dist_32.jsonl"), read_log(two, "full_dist_32.jsonl")
    assert [(round(r["ce"], 4), round(r["kd"], 4)) for r in la] == [(round(r["ce"], 4), round(r["kd"], 4)) for r in lb]


def test_resume_matches_uninterrupted(files, tmp_path):
    flags = [*KD, "--data_path", files["sft"], "--batch_size", "4", "--max_steps", "4"]
    whole, split = fresh_out(files, tmp_path / "whole"), fresh_out(files, tmp_path / "split")
    run("train_distillation.py", *flags, "--out_dir", whole)
    run("train_distillation.py", *flags, "--out_dir", split, "--stop_at_step", "2")
    run("train_distillation.py", *flags, "--out_dir", split, "--resume", "1")
    a = torch.load(f"{whole}/full_dist_32.pth", weights_only=True)
    b = torch.load(f"{split}/full_dist_32.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
