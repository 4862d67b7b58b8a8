"""Exported transformers folders read right outside transformers 5: config.json carries the legacy fields
(rope_theta, ...) beside rope_parameters, the tokenizer config names a class every version knows, and an
older transformers 4.x, installed with pip into a cache folder (.cache/, git-ignored) and run in a
subprocess, computes the same chat-prompt ids, logits and greedy text as our own model."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import small_tokenizers
from conftest import ROOT
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, minimind3_options
from scripts.convert_model import main as convert
from trainer_utils import load_weights, save_weights

OURS = os.path.join(ROOT, "model")
CACHE = os.path.join(ROOT, ".cache", "old_transformers")
# transformers 4.x -> the tokenizers and huggingface_hub it was released with. 4.44 is the 4.4x line (no
# Qwen3 yet); 4.51 is the first 4.x with Qwen3.
OLD_VERSIONS = {"4.44.2": ("0.19.1", "0.24.7"), "4.51.3": ("0.21.4", "0.30.2")}
PROMPTS = ["你好，介绍一下你自己。", "What is 12345 + 3.14? Don't guess.", "<think>\n想一想\n</think>"]


def tiny_model(arch, vocab_size, seed=0):
    torch.manual_seed(seed)
    options = minimind3_options(64) if arch == "qwen3" else dict(num_attention_heads=4, num_key_value_heads=2)
    # a wide init spread makes greedy choices clear-cut (no near-ties to flip)
    return MiniMindForCausalLM(MiniMindConfig(**options, hidden_size=64, num_hidden_layers=2, vocab_size=vocab_size,
                                              initializer_range=0.3))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{(arch, tokenizer name): (native .pth, transformers folder, tokenizer folder)}."""
    d = tmp_path_factory.mktemp("exports")
    tokenizers = {"ours": OURS, "minimind2": small_tokenizers.minimind2_like(d / "tok_mm2"),
                  "minimind3": small_tokenizers.minimind3_like(d / "tok_mm3")}
    made = {}
    for arch, tok_name in [("llama", "ours"), ("llama", "minimind2"), ("qwen3", "ours"), ("qwen3", "minimind3")]:
        from transformers import AutoTokenizer
        vocab = len(AutoTokenizer.from_pretrained(tokenizers[tok_name]))
        path = str(d / f"{arch}_{tok_name}" / "full_sft_64.pth")
        os.makedirs(os.path.dirname(path))
        save_weights(tiny_model(arch, vocab), path, tokenizer_path=tokenizers[tok_name])
        save_dir = str(d / f"{arch}_{tok_name}" / "hf")
        convert(["--weight", path, "--tokenizer_path", tokenizers[tok_name], "--save_dir", save_dir])
        made[arch, tok_name] = (path, save_dir, tokenizers[tok_name])
    return made


def test_config_has_legacy_fields_and_tokenizer_config_is_portable(exports):
    from transformers import AutoTokenizer
    for (arch, tok_name), (_, save_dir, tok_dir) in exports.items():
        with open(os.path.join(save_dir, "config.json")) as f:
            cfg = json.load(f)
        assert cfg["model_type"] == arch
        assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 1e6
        assert cfg["torch_dtype"] == "float32" and cfg["rope_scaling"] is None
        with open(os.path.join(save_dir, "tokenizer_config.json")) as f:
            tcfg = json.load(f)
        assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tcfg["chat_template"]
        assert not os.path.exists(os.path.join(save_dir, "chat_template.jinja"))
        with open(os.path.join(save_dir, "tokenizer.json")) as f:
            assert all(isinstance(m, str) for m in json.load(f)["model"]["merges"])
        # transformers 5 reads it back as the same tokenizer
        a, b = AutoTokenizer.from_pretrained(tok_dir), AutoTokenizer.from_pretrained(save_dir)
        msgs = [{"role": "user", "content": PROMPTS[1]}]
        assert a.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
            b.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert a(PROMPTS[0] + PROMPTS[2])["input_ids"] == b(PROMPTS[0] + PROMPTS[2])["input_ids"]
        assert (a.bos_token_id, a.eos_token_id, a.pad_token_id) == (b.bos_token_id, b.eos_token_id, b.pad_token_id)


def install_old_transformers(version):
    """pip install --target a cache folder inside the repo (once); skip with the reason if pip cannot."""
    target = os.path.join(CACHE, f"transformers-{version}")
    if os.path.exists(os.path.join(target, "transformers", "__init__.py")):
        return target
    tokenizers_version, hub_version = OLD_VERSIONS[version]
    tmp = f"{target}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # --no-deps: the rest (numpy, safetensors, regex, requests, ...) comes from this environment
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                           "--target", tmp, f"transformers=={version}", f"tokenizers=={tokenizers_version}",
                           f"huggingface_hub=={hub_version}"], capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"cannot pip install transformers=={version} into {CACHE} ({why})")
    os.replace(tmp, target)
    return target


@pytest.mark.parametrize("version, arch, tok_name", [("4.44.2", "llama", "ours"), ("4.44.2", "llama", "minimind2"),
                                                     ("4.51.3", "llama", "ours"), ("4.51.3", "qwen3", "minimind3")])
def test_transformers_4x_computes_what_we_compute(exports, tmp_path, version, arch, tok_name):
    from transformers import AutoTokenizer
    site = install_old_transformers(version)
    path, save_dir, tok_dir = exports[arch, tok_name]
    out = str(tmp_path / "reference.npz")
    env = dict(os.environ, PYTHONPATH=site, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "transformers_reference.py"), save_dir, out, *PROMPTS],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = np.load(out)
    meta = json.loads(str(ref["meta"]))
    assert meta["version"] == version
    assert meta["class"] == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model = load_weights(path).eval()
    for n, prompt in enumerate(PROMPTS):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        assert ref[f"ids{n}"].tolist() == ids, prompt
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(logits - ref[f"logits{n}"]).max() < 1e-4, prompt
        want = list(model.stream_generate(torch.tensor([ids]), max_new_tokens=12, temperature=0,
                                          eos_token_id=tokenizer.eos_token_id))
        got = ref[f"greedy{n}"].tolist()
        assert (got[:-1] if got and got[-1] == tokenizer.eos_token_id else got) == want, prompt
        assert meta["texts"][n] == tokenizer.decode(want, skip_special_tokens=True)
