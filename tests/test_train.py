"""Training stages: the chain, DDP parity, resume, each stage's loss, and the errors users hit."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ON_CPU_AND_CUDA, ROOT, run_script

TINY_FLAGS = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--device", "cpu",
              "--num_workers", "0", "--log_interval", "1", "--compile", "0"]  # compile is on by default on CUDA
SCRIPTS = ["train_pretrain.py", "train_full_sft.py", "train_lora.py", "train_dpo.py", "train_distill_reason.py"]


def run(script, *flags, check=True):
    proc = run_script(script, *flags)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def read_log(out_dir, name):
    with open(os.path.join(out_dir, "logs", name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def conv(user, assistant, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return {"conversations": msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Small files in every stage's format (the demo builder's own output is tested in test_demo_data)."""
    d = tmp_path_factory.mktemp("data")
    prose = ("人民日报报道，今年我国经济持续稳定增长，各地积极推进改革开放。 The quick brown fox jumps over the lazy dog, "
             "and the library documents every module in plain English. ")
    pretrain = [{"text": prose[i % 20:] + prose * 3} for i in range(64)]
    sft = [conv(f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。") for a in range(8) for b in range(4)]
    sft[0] = conv("你是谁？", "我是MiniMind，一个小小的语言模型。", system="你是一个乐于助人的助手。")
    dpo = [{"chosen": [{"role": "user", "content": f"{a}加{a}等于多少？"}, {"role": "assistant", "content": f"等于{2 * a}。"}],
            "rejected": [{"role": "user", "content": f"{a}加{a}等于多少？"}, {"role": "assistant", "content": f"等于{2 * a + 1}吧"}]}
           for a in range(32)]
    reason = [conv(f"小明有{a}个苹果，又买了{b}个，一共几个？",
                   f"<think>\n{a}+{b}={a + b}\n</think>\n<answer>\n{a + b}\n</answer>") for a in range(8) for b in range(4)]
    return {"pretrain": write_jsonl(d / "pretrain.jsonl", pretrain), "sft": write_jsonl(d / "sft.jsonl", sft),
            "dpo": write_jsonl(d / "dpo.jsonl", dpo), "reason": write_jsonl(d / "reason.jsonl", reason),
            "dir": d}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_documents_every_flag(script):
    out = run(script, "--help").stdout
    for flag in ["--out_dir", "--epochs", "--batch_size", "--learning_rate", "--device", "--dtype", "--use_wandb",
                 "--wandb_project", "--num_workers", "--accumulation_steps", "--grad_clip", "--warmup_iters",
                 "--log_interval", "--save_interval", "--dim", "--n_layers", "--max_seq_len", "--use_moe",
                 "--data_path", "--resume", "--hidden_size", "--num_hidden_layers"]:
        assert flag in out, f"{script} --help lacks {flag}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small build of the bundled demo data (the builder's own tests check the full build)."""
    d = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, os.path.join(ROOT, "dataset", "build_demo_data.py"), "--out_dir", str(d),
                    "--pretrain_zh_chars", "30000", "--pretrain_en_chars", "10000", "--pretrain_tools", "100", "--pretrain_records", "50",
                    "--pretrain_arith", "50", "--sft", "200", "--dpo", "100",
                    "--r1", "100", "--lora_identity", "100", "--lora_medical", "50"], check=True, capture_output=True)
    return str(d)


def test_whole_chain_on_demo_data(demo, tmp_path):
    out = str(tmp_path / "out")
    common = [*TINY_FLAGS, "--out_dir", out, "--max_seq_len", "64", "--batch_size", "4", "--max_steps", "4"]
    run("train_pretrain.py", *common, "--data_path", f"{demo}/pretrain_hq.jsonl", "--accumulation_steps", "2", "--learning_rate", "1e-3")
    assert os.path.exists(f"{out}/pretrain_64.pth") and os.path.exists(f"{out}/pretrain_64.json")
    run("train_full_sft.py", *common, "--data_path", f"{demo}/sft_mini_512.jsonl", "--learning_rate", "1e-3", "--packing", "1")
    run("train_dpo.py", *common, "--data_path", f"{demo}/dpo.jsonl", "--learning_rate", "1e-4")
    run("train_distill_reason.py", *common, "--data_path", f"{demo}/r1_mix_1024.jsonl", "--learning_rate", "1e-4")
    base_before = open(f"{out}/rlhf_64.pth", "rb").read()
    run("train_lora.py", *common, "--data_path", f"{demo}/lora_identity.jsonl", "--lora_name", "lora_identity", "--learning_rate", "1e-3")
    for name in ["full_sft_64.pth", "rlhf_64.pth", "reason_64.pth", "lora/lora_identity_64.pth"]:
        assert os.path.exists(f"{out}/{name}"), name
    assert open(f"{out}/rlhf_64.pth", "rb").read() == base_before  # LoRA never writes the base
    # DPO starts with policy == reference: loss log(2)
    first = read_log(out, "rlhf_64.jsonl")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-3
    # the weight files load strictly into the next stage's model, with the config from the .json
    from trainer_utils import load_weights
    model = load_weights(f"{out}/reason_64.pth")
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert not any(".tmp" in f for f in os.listdir(out))


def test_each_epoch_trains_every_sample_and_resumes_into_its_short_last_step():
    """As MiniMind's loaders: no sample is dropped; the epoch's last step takes the batches that are left."""
    from types import SimpleNamespace
    from trainer_utils import count_steps, make_loader, step_batches
    samples = [(torch.tensor([i, i]), torch.tensor([i, i])) for i in range(11)]
    args = SimpleNamespace(batch_size=4, accumulation_steps=2, epochs=2, max_steps=0, num_workers=0, seed=0,
                           skip_bad_lines=False, data_path="x.jsonl")

    def run_steps(world, rank, start=0):
        ctx = SimpleNamespace(world=world, rank=rank, cuda=False)
        loader, sampler = make_loader(samples, args, ctx, collate_fn=lambda batch: [int(ids[0]) for ids, _ in batch])
        per_epoch, total = count_steps(loader, args)
        state, steps = {"step": start, "epoch": 0}, []
        for batches in step_batches(loader, sampler, state, per_epoch, total, args):
            steps.append([i for batch, _ in batches for i in batch])
            state["step"] += 1
        return per_epoch, steps

    per_epoch, steps = run_steps(1, 0)
    assert per_epoch == 2 and [len(s) for s in steps] == [8, 3, 8, 3]  # batches of 4, 4, 3
    assert sorted(steps[0] + steps[1]) == sorted(steps[2] + steps[3]) == list(range(11))
    assert steps[0] != steps[2]  # reshuffled each epoch
    assert run_steps(1, 0, start=1)[1] == steps[1:]  # a resume continues into the short step
    ranks = [run_steps(2, r)[1] for r in (0, 1)]  # 6 samples a rank, one repeated to even them out
    assert [len(s) for r in ranks for s in r] == [6, 6, 6, 6]
    assert sorted(set(ranks[0][0] + ranks[1][0])) == list(range(11))


def test_a_file_smaller_than_one_batch_trains(data, tmp_path):
    small = write_jsonl(tmp_path / "three.jsonl", [{"text": "人民日报报道，今年经济稳定增长。"}] * 3)
    out = str(tmp_path / "out")
    run("train_pretrain.py", *TINY_FLAGS, "--out_dir", out, "--max_seq_len", "32", "--data_path", small, "--epochs", "2")
    assert len(read_log(out, "pretrain_64.jsonl")) == 2  # default --batch_size and --accumulation_steps: a step an epoch
    assert os.path.exists(f"{out}/pretrain_64.pth")


def test_moe_pretrain_runs(data, tmp_path):
    out = str(tmp_path / "out")
    run("train_pretrain.py", *TINY_FLAGS, "--use_moe", "1", "--out_dir", out, "--max_seq_len", "32",
        "--batch_size", "4", "--accumulation_steps", "1", "--data_path", data["pretrain"], "--stop_at_step", "3")
    assert os.path.exists(f"{out}/pretrain_64_moe.pth")
    log = read_log(out, "pretrain_64_moe.jsonl")
    assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log)


def test_smeared_keys_model_trains_and_the_next_stage_keeps_it(data, tmp_path):
    out = str(tmp_path / "out")
    run("train_pretrain.py", *TINY_FLAGS, "--smeared_keys", "1", "--out_dir", out, "--max_seq_len", "32",
        "--batch_size", "4", "--data_path", data["pretrain"], "--stop_at_step", "3")
    run("train_full_sft.py", *TINY_FLAGS, "--out_dir", out, "--max_seq_len", "64", "--batch_size", "4",
        "--data_path", data["sft"], "--stop_at_step", "2")  # no flag: the weight file's .json says what it is
    for stage in ("pretrain", "full_sft"):
        with open(f"{out}/{stage}_64.json") as f:
            assert json.load(f)["smeared_keys"] is True
    assert all(math.isfinite(r["loss"]) for r in read_log(out, "full_sft_64.jsonl"))
    from trainer_utils import load_weights
    sft = load_weights(f"{out}/full_sft_64.pth").eval()
    assert sft.config.smeared_keys and hasattr(sft.model.layers[0].self_attn, "key_smear")
    # a bare .pth (its .json lost): the weights tell the loader the keys are smeared
    os.remove(f"{out}/full_sft_64.json")
    args = argparse.Namespace(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, use_moe=False, dropout=0.0)
    bare = load_weights(f"{out}/full_sft_64.pth", args).eval()
    x = torch.randint(3, 300, (1, 12))
    assert torch.equal(bare(x).logits, sft(x).logits)


def test_ddp_two_processes_equal_one_process(data, tmp_path):
    """2 gloo processes x batch 2 == 1 process x batch 4: same samples per step, same weights."""
    common = [*TINY_FLAGS, "--max_seq_len", "32", "--accumulation_steps", "2", "--epochs", "1",
              "--data_path", data["pretrain"], "--learning_rate", "1e-3", "--stop_at_step", "4"]
    run("train_pretrain.py", *common, "--batch_size", "4", "--out_dir", str(tmp_path / "one"))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
                           os.path.join(ROOT, "train_pretrain.py"), *common, "--batch_size", "2", "--out_dir", str(tmp_path / "two")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "pretrain_64.pth", weights_only=True)
    b = torch.load(tmp_path / "two" / "pretrain_64.pth", weights_only=True)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k  # tolerance: fp32 reduction order only
    la, lb = read_log(tmp_path / "one", "pretrain_64.jsonl"), read_log(tmp_path / "two", "pretrain_64.jsonl")
    assert [round(r["loss"], 4) for r in la] == [round(r["loss"], 4) for r in lb]


def test_resume_matches_uninterrupted(data, tmp_path):
    common = [*TINY_FLAGS, "--max_seq_len", "32", "--batch_size", "4", "--accumulation_steps", "2", "--epochs", "2",
              "--data_path", data["pretrain"], "--learning_rate", "1e-3", "--warmup_iters", "2"]
    run("train_pretrain.py", *common, "--out_dir", str(tmp_path / "full"))
    run("train_pretrain.py", *common, "--out_dir", str(tmp_path / "cut"), "--stop_at_step", "5")
    run("train_pretrain.py", *common, "--out_dir", str(tmp_path / "cut"), "--resume", "1")
    full, cut = read_log(tmp_path / "full", "pretrain_64.jsonl"), read_log(tmp_path / "cut", "pretrain_64.jsonl")
    assert len(full) == len(cut) == 16
    for r, s in zip(full, cut):
        assert r["step"] == s["step"] and abs(r["loss"] - s["loss"]) < 1e-6, (r, s)
    a = torch.load(tmp_path / "full" / "pretrain_64.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "pretrain_64.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_minimind3_flag_names_give_the_same_run_and_pretraining_continues_from_a_weight(data, tmp_path):
    """MiniMind-3's command lines run as they are (--save_dir, --from_resume, --use_compile, --hidden_size,
    --from_weight none; --local_rank from torch.distributed.launch) and train exactly what ours do; --from_weight
    <stage> continues pretraining from that file."""
    common = ["--device", "cpu", "--num_workers", "0", "--log_interval", "1", "--n_heads", "4", "--n_kv_heads", "2",
              "--max_seq_len", "32", "--batch_size", "4", "--data_path", data["pretrain"], "--learning_rate", "1e-2", "--max_steps", "6"]
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    run("train_pretrain.py", *common, "--dim", "64", "--n_layers", "2", "--compile", "0", "--out_dir", ours)
    run("train_pretrain.py", *common, "--hidden_size", "64", "--num_hidden_layers", "2", "--use_compile", "0", "--save_dir", theirs,
        "--from_resume", "0", "--from_weight", "none", "--local_rank", "0")
    a = torch.load(f"{ours}/pretrain_64.pth", weights_only=True)
    b = torch.load(f"{theirs}/pretrain_64.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    run("train_pretrain.py", *common, "--dim", "64", "--n_layers", "2", "--compile", "0", "--out_dir", ours,
        "--from_weight", "pretrain", "--save_weight", "pretrain2", "--max_steps", "2")
    fresh, continued = read_log(ours, "pretrain_64.jsonl"), read_log(ours, "pretrain2_64.jsonl")
    assert continued[0]["loss"] < fresh[0]["loss"] - 1.0, (fresh, continued)  # it starts where the first run ended
    with open(f"{ours}/pretrain2_64.json") as f:
        assert json.load(f)["hidden_size"] == 64


# ----------------------------------------------------------------------------------------------------
# Each stage's loss, in process
# ----------------------------------------------------------------------------------------------------
def tiny_model(seed=0, initializer_range=0.02):
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              initializer_range=initializer_range))


def one_batch(dataset, n=4):
    from dataset.lm_dataset import make_collate
    return make_collate(0)([dataset[i] for i in range(n)])


def overfit(model, loss_fn, batch, steps=40, lr=3e-3, params=None):
    opt = torch.optim.AdamW(params if params is not None else model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss, _ = loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def tok():
    from dataset.lm_dataset import load_tokenizer
    return load_tokenizer(os.path.join(ROOT, "model"))


def test_pretrain_and_sft_loss_falls_on_one_batch(data, tok):
    import train_full_sft
    import train_pretrain
    from dataset.lm_dataset import PretrainDataset, SFTDataset
    losses = overfit(tiny_model(), train_pretrain.loss_fn, one_batch(PretrainDataset(data["pretrain"], tok, max_length=32)))
    assert losses[-1] < 0.5 * losses[0]
    losses = overfit(tiny_model(), train_full_sft.loss_fn, one_batch(SFTDataset(data["sft"], tok, max_length=64)))
    assert losses[-1] < 0.5 * losses[0]


def test_lora_loss_falls_and_base_is_bit_identical(data, tok):
    import train_lora
    from dataset.lm_dataset import SFTDataset
    from model.model_lora import apply_lora, mark_only_lora_trainable
    # A frozen embedding of std 0.02 caps the logits a LoRA can reach (RMSNorm fixes the hidden norm), so the
    # base gets trained-size weights.
    model = tiny_model(initializer_range=0.2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=8)
    params = mark_only_lora_trainable(model)
    losses = overfit(model, train_lora.loss_fn, one_batch(SFTDataset(data["sft"], tok, max_length=64)), lr=1e-2, params=params)
    assert losses[-1] < 0.5 * losses[0]
    for k, v in base.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_dpo_loss_closed_form_and_training(data, tok):
    import train_dpo
    from dataset.lm_dataset import DPODataset
    pc, pr, rc, rr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5]), torch.tensor([-1.5, -2.0]), torch.tensor([-2.0, -2.0])
    beta = 0.1
    expected = sum(math.log(1 + math.exp(-beta * ((a - b) - (c - d)))) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())) / 2
    assert abs(train_dpo.dpo_loss(pc, pr, rc, rr, beta).item() - expected) < 1e-6
    policy = tiny_model()
    reference = tiny_model().eval().requires_grad_(False)
    batch = one_batch(DPODataset(data["dpo"], tok, max_length=64))
    for reduction in ("mean", "sum"):
        loss, metrics = train_dpo.dpo_batch_loss(policy, batch, reference, beta, reduction)
        assert abs(loss.item() - math.log(2)) < 1e-5  # policy == reference at step 0
    fn = lambda m, b: train_dpo.dpo_batch_loss(m, b, reference, 0.5, "mean")
    losses = overfit(policy, fn, batch, steps=30, lr=1e-3)
    assert losses[-1] < 0.5 * losses[0]
    _, metrics = fn(policy, batch)
    assert metrics["reward_acc"].item() == 1.0 and metrics["margin"].item() > 0


def test_reason_weights_hit_only_tags_in_assistant_spans(tmp_path, tok):
    import train_distill_reason as tdr
    from dataset.lm_dataset import SFTDataset
    # the user also types the tags: those must get no weight
    path = write_jsonl(tmp_path / "r.jsonl", [conv("请用<think>和<answer>格式回答：1+1=?", "<think>\n1+1=2\n</think>\n<answer>\n2\n</answer>",
                                                   system="<think>系统</think>")])
    ids, labels = one_batch(SFTDataset(path, tok, max_length=128), n=1)
    sequences = list(tdr.tag_sequences(tok).values())
    assert [len(s) for s in sequences] == [1, 1, 1, 1]  # single tokens in our tokenizer (test_interop: several)
    targets, weights, labelled = tdr.tag_weights(labels, sequences, 10.0)
    heavy = (weights == 10.0)
    assert tok.convert_ids_to_tokens(targets[heavy].tolist()) == ["<think>", "</think>", "<answer>", "</answer>"]
    assert torch.equal(weights[~heavy & labelled], torch.ones(int((~heavy & labelled).sum())))
    assert (weights[~labelled] == 0).all()
    losses = overfit(tiny_model(), lambda m, b: tdr.reason_loss(m, b, sequences, 10.0), (ids, labels))
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------------------------------
# Bad input: one clear line, non-zero exit, nothing half-written
# ----------------------------------------------------------------------------------------------------
def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), proc.stderr[-2000:]
    for n in needles:
        assert n in last, last


def test_missing_previous_stage(data, tmp_path):
    proc = run("train_full_sft.py", *TINY_FLAGS, "--out_dir", str(tmp_path), "--data_path", data["sft"], check=False)
    assert_one_line_error(proc, "pretrain_64.pth", "train_pretrain.py")
    proc = run("train_lora.py", *TINY_FLAGS, "--out_dir", str(tmp_path), "--data_path", data["sft"], check=False)
    assert_one_line_error(proc, "rlhf_64.pth", "train_dpo.py")


def test_wrong_stage_data_and_bad_line(data, tmp_path):
    proc = run("train_pretrain.py", *TINY_FLAGS, "--out_dir", str(tmp_path), "--data_path", data["sft"], check=False)
    assert_one_line_error(proc, "sft.jsonl:1")
    bad = tmp_path / "bad.jsonl"
    lines = open(data["pretrain"], encoding="utf-8").read().splitlines()
    lines.insert(3, '{"text": "unterminated')
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = run("train_pretrain.py", *TINY_FLAGS, "--out_dir", str(tmp_path), "--data_path", str(bad), check=False)
    assert_one_line_error(proc, "bad.jsonl:4")


def test_unwritable_out_dir(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run("train_pretrain.py", *TINY_FLAGS, "--out_dir", str(blocker / "sub"), "--data_path", data["pretrain"],
               "--max_seq_len", "32", "--batch_size", "4", check=False)
    assert_one_line_error(proc, "--out_dir")


def test_crash_mid_save_keeps_old_weight_file(tmp_path, monkeypatch):
    """A save that dies half-way (here: torch.save raises after writing part of the file) leaves the previous
    weights and their .json as they were. tests/test_errors.py does it for real: a full disk, a size limit."""
    import errno

    import trainer_utils
    model = tiny_model()
    path = str(tmp_path / "pretrain_64.pth")
    trainer_utils.save_weights(model, path)
    before = open(path, "rb").read(), open(path[:-4] + ".json", "rb").read()

    def exploding_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(trainer_utils.torch, "save", exploding_save)
    with pytest.raises(trainer_utils.UserError, match="no space left"):
        trainer_utils.save_weights(tiny_model(seed=1), path)
    assert (open(path, "rb").read(), open(path[:-4] + ".json", "rb").read()) == before
    assert not any(".tmp" in f for f in os.listdir(tmp_path))


def test_half_precision_weight_file_is_half_the_size_and_loads_back(tmp_path):
    """--save_dtype float16 / bfloat16 halves the file: the tied embedding (lm_head) is stored once, as in float32,
    and loads back tied, equal to the float32 weights up to the rounding."""
    from trainer_utils import load_weights, save_weights
    model = tiny_model()
    size = {}
    for dtype in ("float32", "float16", "bfloat16"):
        save_weights(model, str(tmp_path / f"{dtype}_64.pth"), dtype)
        size[dtype] = os.path.getsize(tmp_path / f"{dtype}_64.pth")
    assert size["float16"] < 0.52 * size["float32"] and size["bfloat16"] < 0.52 * size["float32"], size
    for dtype, tol in (("float16", 1e-3), ("bfloat16", 1e-2)):
        loaded = load_weights(str(tmp_path / f"{dtype}_64.pth"))
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.allclose(a, b.float(), atol=tol, rtol=tol), (dtype, name)


def test_mismatched_weight_file_is_one_clear_error(tmp_path):
    import trainer_utils
    model = tiny_model()
    path = str(tmp_path / "plain.pth")
    torch.save(model.state_dict(), path)  # a plain MiniMind2-style .pth: sizes come from the flags

    class Args:
        dim, n_layers, n_heads, n_kv_heads, use_moe, dropout = 64, 2, 4, 2, False, 0.0
    loaded = trainer_utils.load_weights(path, args=Args)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    Args.n_layers = 3
    with pytest.raises(trainer_utils.UserError, match="n_layers"):
        trainer_utils.load_weights(path, args=Args)


@ON_CPU_AND_CUDA
@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_packed_batch_gives_the_padded_loss(data, tok, kind, device):
    """--packing changes the layout (fewer rows, no cross-sample attention), not the loss: in float32, and
    under bf16 autocast as training runs on CUDA (there the padded batch takes SDPA's flash kernel, the packed
    one the masked memory-efficient kernel)."""
    import train_pretrain
    from dataset.lm_dataset import PretrainDataset, SFTDataset, make_collate, make_pack_collate
    from trainer_utils import to_device
    ds = PretrainDataset(data["pretrain"], tok, max_length=48) if kind == "pretrain" else SFTDataset(data["sft"], tok, max_length=64)
    samples = [ds[i] for i in range(8)]
    if kind == "pretrain":  # a realistic mix: most samples far shorter than max_seq_len
        samples = [(ids[:n], lab[:n]) for (ids, lab), n in zip(samples, [5, 9, 48, 12, 7, 20, 6, 11])]
    padded = make_collate(0)(samples)
    packed = make_pack_collate(64 if kind == "sft" else 48)(samples)
    assert packed[0].shape[0] < padded[0].shape[0]
    assert int((packed[1] != -100).sum()) == int((padded[1][:, 1:] != -100).sum())
    model = tiny_model(initializer_range=0.2).eval().to(device)
    padded, packed = to_device(padded, device), to_device(packed, device)
    a, _ = train_pretrain.loss_fn(model, padded)
    b, _ = train_pretrain.loss_fn(model, packed)
    assert torch.allclose(a, b, atol=1e-5 if device == "cpu" else 1e-4)  # CUDA kernels sum in another order
    with torch.autocast(device, dtype=torch.bfloat16):
        a16, _ = train_pretrain.loss_fn(model, padded)
        b16, _ = train_pretrain.loss_fn(model, packed)
    assert abs(a16 - b16) <= 1e-2 * a and abs(a16 - a) <= 2e-2 * a  # bf16 keeps 8 bits of mantissa


def test_packing_flag_trains(data, tmp_path):
    out = str(tmp_path / "out")
    run("train_pretrain.py", *TINY_FLAGS, "--packing", "1", "--out_dir", out, "--max_seq_len", "64", "--batch_size", "8",
        "--accumulation_steps", "1", "--data_path", data["pretrain"], "--max_steps", "3")
    assert len(read_log(out, "pretrain_64.jsonl")) == 3


def test_wandb_offline_without_key_and_resume_keeps_the_run(data, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "out"
    common = [*TINY_FLAGS, "--out_dir", str(out), "--max_seq_len", "32", "--batch_size", "4", "--accumulation_steps", "1",
              "--data_path", data["pretrain"], "--max_steps", "4", "--use_wandb", "1"]
    run("train_pretrain.py", *common, "--stop_at_step", "2")
    run("train_pretrain.py", *common, "--resume", "1")
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and runs[0].rsplit("-", 1)[1] == runs[1].rsplit("-", 1)[1]  # one wandb run id, offline


@ON_CPU_AND_CUDA
def test_speedups_do_not_change_the_math(data, tmp_path, device):
    """torch.compile (inductor) and packing give the eager, padded run's losses: on the CPU in float32, on CUDA
    in bf16 (its default there), where compile and packing are also checked alone (compile alone is the flash
    path a user gets from --compile 1; on the CPU the compile time of one more run is not worth it)."""
    common = [*TINY_FLAGS, "--device", device, "--max_seq_len", "48", "--batch_size", "8", "--accumulation_steps", "1",
              "--data_path", data["pretrain"], "--max_steps", "6", "--learning_rate", "1e-3"]  # the later --device wins
    run("train_pretrain.py", *common, "--out_dir", str(tmp_path / "eager"))
    eager = read_log(tmp_path / "eager", "pretrain_64.jsonl")
    assert len(eager) == 6
    variants = {"compile_packing": ["--compile", "1", "--packing", "1"]}
    if device == "cuda":
        variants.update(compile=["--compile", "1"], packing=["--packing", "1"])
    for name, flags in variants.items():
        run("train_pretrain.py", *common, "--out_dir", str(tmp_path / name), *flags)
        fast = read_log(tmp_path / name, "pretrain_64.jsonl")
        assert len(fast) == 6, name
        for a, b in zip(eager, fast):
            assert abs(a["loss"] - b["loss"]) < 0.01 * a["loss"], (name, a, b)


@pytest.mark.cuda
def test_bf16_training_tracks_float32_on_cuda(data, tmp_path):
    """--dtype bfloat16 (autocast, the CUDA default) trains like --dtype float32: the same losses step by step, up
    to bf16's rounding."""
    common = [*TINY_FLAGS, "--device", "cuda", "--max_seq_len", "48", "--batch_size", "8", "--accumulation_steps", "1",
              "--data_path", data["pretrain"], "--max_steps", "6", "--learning_rate", "1e-3"]
    logs = {}
    for dtype in ("float32", "bfloat16"):
        proc = run("train_pretrain.py", *common, "--dtype", dtype, "--out_dir", str(tmp_path / dtype))
        assert f"dtype torch.{dtype}, compile off" in proc.stdout
        logs[dtype] = read_log(tmp_path / dtype, "pretrain_64.jsonl")
    assert len(logs["float32"]) == len(logs["bfloat16"]) == 6
    for a, b in zip(logs["float32"], logs["bfloat16"]):
        assert abs(a["loss"] - b["loss"]) < 0.01 * a["loss"], (a, b)


@ON_CPU_AND_CUDA
def test_compile_is_on_by_default_on_cuda_only(data, tmp_path, device):
    """Unset, --compile follows the device: on for CUDA (where it measured faster), off on the CPU."""
    flags = TINY_FLAGS[:-2]  # without --compile 0
    proc = run("train_pretrain.py", *flags, "--device", device, "--max_seq_len", "32", "--batch_size", "4",
               "--accumulation_steps", "1", "--data_path", data["pretrain"], "--max_steps", "2", "--out_dir", str(tmp_path))
    assert f"compile {'on' if device == 'cuda' else 'off'}" in proc.stdout


def test_unknown_packed_attention_is_one_clear_error(data, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_PACKED_ATTENTION", "flash")
    proc = run("train_pretrain.py", *TINY_FLAGS, "--max_seq_len", "32", "--batch_size", "4", "--data_path", data["pretrain"],
               "--max_steps", "1", "--out_dir", str(tmp_path), check=False)
    assert proc.returncode == 1 and not os.listdir(tmp_path)
    assert proc.stderr.strip().splitlines() == ["error: MINIMIND_PACKED_ATTENTION=flash: use flex (the default) or sdpa "
                                                "(the attention of packed batches on CUDA)"]


@pytest.mark.cuda
def test_float16_run_uses_the_gradscaler_and_skips_an_overflowing_step(data, tmp_path, monkeypatch):
    """train_pretrain.py --dtype float16 on CUDA: a step whose gradients overflow (the loss itself finite, so the
    loop's own non-finite check lets it through) is skipped by the GradScaler, which halves its scale; the run
    goes on and saves finite weights. Compared with the same run without the overflow (whose scaler skips
    whatever it skips by itself), through the counts in the resume file."""
    import train_pretrain
    real_loss_fn = train_pretrain.loss_fn

    def train_float16(out, overflow_at_call):
        losses = []

        def loss_fn(model, batch):
            loss, metrics = real_loss_fn(model, batch)
            losses.append(loss.item())
            if len(losses) == overflow_at_call:
                loss.register_hook(lambda g: g * float("inf"))
            return loss, metrics
        monkeypatch.setattr(train_pretrain, "loss_fn", loss_fn)
        monkeypatch.setattr(sys, "argv", ["train_pretrain.py", *TINY_FLAGS, "--device", "cuda", "--dtype", "float16",
                                          "--max_seq_len", "48", "--batch_size", "8", "--accumulation_steps", "1",
                                          "--data_path", data["pretrain"], "--max_steps", "4", "--save_interval", "100",
                                          "--learning_rate", "1e-3", "--out_dir", str(out)])
        train_pretrain.main()
        assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
        assert [r["step"] for r in read_log(out, "pretrain_64.jsonl")] == [1, 2, 3, 4]
        weights = torch.load(out / "pretrain_64.pth", weights_only=True)
        assert all(torch.isfinite(v).all() for v in weights.values())
        ck = torch.load(out / "pretrain_64_resume.pth", weights_only=True)
        adam_steps = {s["step"].item() for s in ck["optimizer"]["state"].values()}
        assert len(adam_steps) == 1 and ck["state"]["step"] == 4
        return ck["state"]["optimizer_steps"], adam_steps.pop(), ck["scaler"]

    taken, adam_steps, scaler = train_float16(tmp_path / "clean", overflow_at_call=None)
    assert scaler["scale"] > 0 and taken == adam_steps >= 3  # a GradScaler (an unused one saves {}), steps taken
    taken_overflow, adam_steps_overflow, scaler_overflow = train_float16(tmp_path / "overflow", overflow_at_call=2)
    assert taken_overflow == taken - 1 and adam_steps_overflow == adam_steps - 1
    assert scaler_overflow["scale"] == scaler["scale"] / 2


def test_resume_with_other_settings_is_one_clear_error(data, tmp_path):
    common = [*TINY_FLAGS, "--max_seq_len", "32", "--accumulation_steps", "1", "--data_path", data["pretrain"],
              "--max_steps", "4", "--out_dir", str(tmp_path)]
    run("train_pretrain.py", *common, "--batch_size", "4", "--stop_at_step", "2")
    proc = run("train_pretrain.py", *common, "--batch_size", "8", "--resume", "1", check=False)
    assert_one_line_error(proc, "batch_size 4 -> 8")
