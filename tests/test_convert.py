"""scripts/convert_model.py: native checkpoints <-> transformers folders, checked against the native model."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import run_script
from model.model_lora import apply_lora, load_lora, save_lora
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from scripts.convert_model import main as convert
from trainer_utils import UserError, load_weights, save_weights, weight_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "model")
DIM = 64
# A large init spread makes the random model's greedy choices clear-cut (no near-ties to flip).
TINY = dict(hidden_size=DIM, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    assert os.path.exists(os.path.join(TOKENIZER, "tokenizer.json")), "model/tokenizer.json missing: run train_tokenizer.py"
    return AutoTokenizer.from_pretrained(TOKENIZER)


def make_checkpoint(out_dir, tokenizer, moe=False, stage="full_sft", seed=0, smeared_keys=False):
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY, vocab_size=len(tokenizer), use_moe=moe, smeared_keys=smeared_keys))
    path = weight_path(str(out_dir), stage, DIM, moe)
    save_weights(model, path)
    return path


def prompt(tokenizer, text="你好，介绍一下你自己。"):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    return torch.tensor([ids])


def native_greedy(model, ids, n=20):
    return list(model.stream_generate(ids, max_new_tokens=n, temperature=0))


def hf_greedy(model, ids, n=20):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)[0, ids.shape[1]:].tolist()
    return out[:-1] if out and out[-1] == 2 else out  # the native loop stops before eos, generate() keeps it


def minimind_generate_is_broken():
    """Does transformers' generate() on the in-tree MiniMindForCausalLM disagree with its own greedy loop?"""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY, vocab_size=300)).eval()
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    return hf_greedy(model, ids, 6) != native_greedy(model, ids, 6)


@pytest.fixture(scope="module")
def dense(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("dense")
    path = make_checkpoint(out, tokenizer)
    save_dir = str(out / "hf")
    convert(["--out_dir", str(out), "--model_mode", "1", "--dim", str(DIM), "--tokenizer_path", TOKENIZER, "--save_dir", save_dir])
    return out, path, save_dir


def test_dense_export_is_plain_llama_with_same_logits_and_greedy_tokens(dense, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM
    _, path, save_dir = dense
    with open(os.path.join(save_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama" and "auto_map" not in cfg
    assert not [f for f in os.listdir(save_dir) if f.endswith(".py")]
    assert os.path.exists(os.path.join(save_dir, "model.safetensors"))
    gen = GenerationConfig.from_pretrained(save_dir)
    assert (gen.eos_token_id, gen.pad_token_id, gen.bos_token_id) == (2, 0, 1)

    hf = AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32).eval()  # no trust_remote_code
    assert type(hf) is LlamaForCausalLM
    native = load_weights(path).eval()
    ids = prompt(tokenizer)
    with torch.no_grad():
        a, b = native(ids).logits, hf(ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    want = native_greedy(native, ids)
    assert len(want) > 5
    assert hf_greedy(hf, ids) == want

    # tokenizer and chat template travel with the model
    tok2 = AutoTokenizer.from_pretrained(save_dir)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok2.eos_token_id == 2 and tok2.pad_token_id == 0


@pytest.mark.parametrize("variant", ["dense", "moe", "smeared_keys"])
def test_export_then_import_round_trips_the_state_dict_exactly(tmp_path, tokenizer, variant):
    path = make_checkpoint(tmp_path, tokenizer, moe=variant == "moe", seed=3, smeared_keys=variant == "smeared_keys")
    save_dir, back = str(tmp_path / "hf"), str(tmp_path / "back" / "full_sft_64.pth")
    convert(["--weight", path, "--tokenizer_path", TOKENIZER, "--save_dir", save_dir])
    convert(["--to_native", "--model_path", save_dir, "--weight", back])
    a, b = torch.load(path, weights_only=True), torch.load(back, weights_only=True)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with open(path[:-4] + ".json") as f, open(back[:-4] + ".json") as g:
        ca, cb = json.load(f), json.load(g)
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size", "rope_theta", "rms_norm_eps", "use_moe", "smeared_keys"):
        assert ca[k] == cb[k], k
    load_weights(back)  # the trainers' strict loader takes it


@pytest.mark.parametrize("variant", ["moe", "smeared_keys"])
def test_minimind_code_export_loads_with_remote_code_in_a_clean_process(tmp_path, tokenizer, dense, variant):
    """MoE and smeared keys have no transformers class: the export carries model_minimind.py, which must import on
    its own: load in a fresh interpreter, outside the repo."""
    path = make_checkpoint(tmp_path, tokenizer, moe=variant == "moe", seed=1, smeared_keys=variant == "smeared_keys")
    save_dir = str(tmp_path / "hf_moe")
    convert(["--weight", path, "--tokenizer_path", TOKENIZER, "--save_dir", save_dir])
    with open(os.path.join(save_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "minimind" and cfg["auto_map"]["AutoModelForCausalLM"] == "model_minimind.MiniMindForCausalLM"
    ids = prompt(tokenizer)
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import torch
from transformers import AutoModelForCausalLM
ids = torch.load({str(tmp_path / 'ids.pt')!r})
try:
    AutoModelForCausalLM.from_pretrained({save_dir!r})
    refused = False
except ValueError:
    refused = True
moe = AutoModelForCausalLM.from_pretrained({save_dir!r}, trust_remote_code=True, dtype=torch.float32).eval()
dense = AutoModelForCausalLM.from_pretrained({dense[2]!r}, dtype=torch.float32).eval()
with torch.no_grad():
    out = dict(refused=refused, moe_module=type(moe).__module__, dense_class=type(dense).__name__,
               moe=moe(ids).logits, dense=dense(ids).logits,
               moe_greedy=moe.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12)[0, ids.shape[1]:].tolist())
torch.save(out, {str(tmp_path / 'out.pt')!r})
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    r = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    assert out["refused"], "a MiniMind-code export must need trust_remote_code=True"
    assert out["moe_module"].startswith("transformers_modules"), out["moe_module"]
    assert out["dense_class"] == "LlamaForCausalLM"
    native = load_weights(path).eval()
    with torch.no_grad():
        assert torch.allclose(native(ids).logits, out["moe"], atol=1e-4)
        assert torch.allclose(load_weights(dense[1])(ids).logits, out["dense"], atol=1e-4)
    greedy = out["moe_greedy"]
    greedy = greedy[:-1] if greedy and greedy[-1] == 2 else greedy
    if greedy != native_greedy(native, ids, 12) and minimind_generate_is_broken():
        pytest.xfail("model_minimind.py ignores the `cache=` kwarg transformers 5 generate() passes (no KV context "
                     "after the first step); native MiniMindForCausalLM.generate() is wrong too, so fix it there")
    assert greedy == native_greedy(native, ids, 12)


def test_lora_merged_export_equals_native_model_with_adapter(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM
    path = make_checkpoint(tmp_path, tokenizer, seed=2)
    base = load_weights(path)
    apply_lora(base, rank=4)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.2)  # a trained-looking adapter (a fresh one is a no-op)
    os.makedirs(tmp_path / "lora")
    save_lora(base, str(tmp_path / "lora" / f"lora_test_{DIM}.pth"))
    save_dir = str(tmp_path / "hf_lora")
    convert(["--out_dir", str(tmp_path), "--dim", str(DIM), "--lora_name", "lora_test", "--tokenizer_path", TOKENIZER,
             "--save_dir", save_dir])
    with_adapter = load_weights(path).eval()
    load_lora(with_adapter, str(tmp_path / "lora" / f"lora_test_{DIM}.pth"))  # unmerged: the forward hook path
    hf = AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32).eval()
    ids = prompt(tokenizer, "lora?")
    with torch.no_grad():
        want, got, plain = with_adapter(ids).logits, hf(ids).logits, load_weights(path)(ids).logits
    assert not torch.allclose(want, plain, atol=1e-2), "the adapter should change the model"
    assert torch.allclose(want, got, atol=1e-4), (want - got).abs().max()


def test_clear_errors(tmp_path, tokenizer, dense):
    out_dir, path, save_dir = dense
    cases = [
        (["--out_dir", str(tmp_path), "--dim", str(DIM), "--save_dir", str(tmp_path / "x")], "train_full_sft.py"),
        (["--weight", path, "--lora_name", "nope", "--out_dir", str(tmp_path), "--save_dir", str(tmp_path / "x")], "nope"),
        (["--weight", path, "--save_dir", save_dir], "not empty"),  # never overwrite silently
        (["--weight", path, "--tokenizer_path", str(tmp_path), "--save_dir", str(tmp_path / "y")], "tokenizer.json"),
        (["--to_native", "--model_path", str(tmp_path / "missing"), "--weight", str(tmp_path / "a.pth")], "not found"),
        (["--to_native", "--model_path", str(tmp_path), "--weight", str(tmp_path / "a.pth")], "config.json"),
        (["--to_native", "--model_path", save_dir, "--weight", path], "exists"),
        (["--to_native"], "--model_path"),
    ]
    for argv, needle in cases:
        with pytest.raises(UserError, match=None) as e:
            convert(argv)
        assert needle in str(e.value), (argv, str(e.value))
        assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")
    # as a command: one line on stderr, exit status 1
    r = run_script("scripts/convert_model.py", "--weight", tmp_path / "none.pth")
    assert r.returncode == 1 and r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
