"""scripts/convert_model.py --gguf: one file for llama.cpp / ollama. The file's contents are checked with the
gguf package's reader (always); where llama-cpp-python is installed (not in CI: it builds from source for
~10 minutes), llama.cpp itself, in a subprocess, must tokenize our chat prompts to the ids transformers gives
and generate the same greedy text as transformers, in float32 and in q8_0."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, minimind3_options
from scripts.convert_model import main as convert
from scripts.gguf_export import rotate_half_to_interleaved
from trainer_utils import save_weights

OURS = os.path.join(ROOT, "model")
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
CONVERSATIONS = [
    [{"role": "user", "content": "你好，介绍一下你自己。"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What's 12345 + 3.14? Don't guess; it's   easy!!"}],
    [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "<think>\n1+1=2\n</think>\n<answer>\n2\n</answer>"},
     {"role": "user", "content": "2025年1月1日是星期几？\t😀"}],
]


REPLIES = ["我是一个小模型，很高兴认识你！", "12345 + 3.14 = 12348.14. Easy.", "2025年1月1日是星期三。😀"]


def trained(arch, steps=150):
    """A tiny model that has learned a reply to each conversation: its greedy choices have the margins of a
    trained model's, so comparing q8_0 with float32 is meaningful (a random model's near-ties flip)."""
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    options = minimind3_options(64) if arch == "qwen3" else dict(num_attention_heads=4, num_key_value_heads=2)
    model = MiniMindForCausalLM(MiniMindConfig(**options, hidden_size=64, num_hidden_layers=2))
    tok = AutoTokenizer.from_pretrained(OURS)
    rows = [tok.apply_chat_template(c + [{"role": "assistant", "content": r}], tokenize=True, return_dict=False)
            for c, r in zip(CONVERSATIONS, REPLIES)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{arch: (native .pth, transformers folder, {gguf type: file})}."""
    d = tmp_path_factory.mktemp("gguf")
    made = {}
    for arch in ("llama", "qwen3"):
        path = str(d / arch / "full_sft_64.pth")
        os.makedirs(os.path.dirname(path))
        save_weights(trained(arch), path, tokenizer_path=OURS)
        convert(["--weight", path, "--save_dir", str(d / arch / "hf")])
        ggufs = {}
        for qtype in ("f32", "q8_0"):
            ggufs[qtype] = str(d / arch / f"model-{qtype}.gguf")
            convert(["--weight", path, "--gguf", ggufs[qtype], "--gguf_type", qtype])
        made[arch] = (path, str(d / arch / "hf"), ggufs)
    return made


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gguf_holds_weights_tokenizer_and_template(files, arch):
    import gguf
    from transformers import AutoTokenizer
    path, _, ggufs = files[arch]
    tok = AutoTokenizer.from_pretrained(OURS)
    sd = torch.load(path, weights_only=True)
    reader = gguf.GGUFReader(ggufs["f32"])
    assert field(reader, "general.architecture") == arch
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 6400 and tokens == tok.convert_ids_to_tokens(list(range(6400)))
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[tok.convert_tokens_to_ids("<|im_start|>")] == gguf.TokenType.CONTROL
    assert types[tok.convert_tokens_to_ids("<think>")] == gguf.TokenType.USER_DEFINED
    assert types[300] == gguf.TokenType.NORMAL
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1 and field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert field(reader, "tokenizer.chat_template") == tok.chat_template
    assert field(reader, f"{arch}.rope.freq_base") == 1e6
    assert field(reader, f"{arch}.attention.head_count_kv") == (4 if arch == "qwen3" else 2)

    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                           "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    if arch == "qwen3":
        expected |= {f"blk.{i}.attn_{n}_norm.weight" for i in range(2) for n in ("q", "k")}
    assert set(tensors) == expected  # tied output: llama.cpp reuses token_embd
    assert np.array_equal(tensors["token_embd.weight"].data, sd["model.embed_tokens.weight"].numpy())
    q = torch.from_numpy(np.array(tensors["blk.1.attn_q.weight"].data))
    if arch == "llama":  # llama.cpp's llama rotates adjacent pairs: the rows are reordered, nothing else
        assert torch.equal(q, rotate_half_to_interleaved(sd["model.layers.1.self_attn.q_proj.weight"], 4))
        assert not torch.equal(q, sd["model.layers.1.self_attn.q_proj.weight"])
    else:  # qwen3 rotates halves, as transformers does
        assert torch.equal(q, sd["model.layers.1.self_attn.q_proj.weight"])

    quantised = {t.name: t for t in gguf.GGUFReader(ggufs["q8_0"]).tensors}
    assert quantised["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert quantised["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    down = gguf.quants.dequantize(quantised["blk.0.ffn_down.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    want = sd["model.layers.0.mlp.down_proj.weight"].numpy()
    assert np.abs(down - want).max() < np.abs(want).max() / 100


def test_rotate_half_to_interleaved_keeps_attention_scores():
    """Reordering q and k rows the same way per head leaves q.k unchanged and turns rotate-half RoPE into
    adjacent-pair RoPE: the reason llama.cpp's llama gives transformers' numbers."""
    from model.model_minimind import apply_rotary
    torch.manual_seed(0)
    heads, d, T = 2, 8, 5
    wq, wk, x = torch.randn(heads * d, 16), torch.randn(heads * d, 16), torch.randn(T, 16)
    theta = 1e4 ** (-torch.arange(0, d, 2).float() / d)
    angles = torch.arange(T).float()[:, None] * theta  # [T, d/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1)[None], torch.cat([angles.sin()] * 2, -1)[None]
    q = apply_rotary((x @ wq.T).view(1, T, heads, d).transpose(1, 2), cos, sin)
    k = apply_rotary((x @ wk.T).view(1, T, heads, d).transpose(1, 2), cos, sin)

    def adjacent_pairs(v):  # llama.cpp's "normal" RoPE: rotate (2i, 2i+1)
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = angles.cos()[None, None], angles.sin()[None, None]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    q2 = adjacent_pairs((x @ rotate_half_to_interleaved(wq, heads).T).view(1, T, heads, d).transpose(1, 2))
    k2 = adjacent_pairs((x @ rotate_half_to_interleaved(wk, heads).T).view(1, T, heads, d).transpose(1, 2))
    assert torch.allclose(q @ k.transpose(-1, -2), q2 @ k2.transpose(-1, -2), atol=1e-4)


def test_gguf_refuses_what_it_cannot_write_in_one_line(tmp_path, files):
    moe = str(tmp_path / "full_sft_64_moe.pth")
    torch.manual_seed(0)
    save_weights(MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, use_moe=True)), moe)
    smeared = str(tmp_path / "full_sft_64.pth")
    save_weights(MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, smeared_keys=True)), smeared)
    existing = files["llama"][2]["f32"]
    for flags, needle in [(["--weight", moe, "--gguf", str(tmp_path / "m.gguf")], "dense"),
                          (["--weight", smeared, "--gguf", str(tmp_path / "m.gguf")], "smeared keys"),
                          (["--weight", files["llama"][0], "--gguf", existing], "--overwrite"),
                          (["--weight", files["llama"][0], "--gguf", str(tmp_path / "m.bin")], ".gguf")]:
        proc = run_script("scripts/convert_model.py", *flags)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and needle in last, last
    assert not os.path.exists(tmp_path / "m.gguf")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip install llama-cpp-python; it builds from source)")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_llama_cpp_tokenizes_and_generates_like_transformers(files, tmp_path, arch, qtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _, hf_dir, ggufs = files[arch]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompts = [{"text": tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False), "messages": c}
               for c in CONVERSATIONS]
    with open(tmp_path / "prompts.json", "w", encoding="utf-8") as f:
        json.dump(prompts, f, ensure_ascii=False)
    out = tmp_path / "llama_cpp.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "llama_cpp_reference.py"), ggufs[qtype], str(out),
                           str(tmp_path / "prompts.json")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, (f"llama.cpp exited with {proc.returncode} (-4: SIGILL, a build using CPU instructions "
                                  f"this machine lacks)\n{proc.stderr[-2000:]}")
    with open(out, encoding="utf-8") as f:
        results = json.load(f)
    for prompt, got in zip(prompts, results):
        ids = tok(prompt["text"], add_special_tokens=False)["input_ids"]
        assert got["ids"] == ids, prompt["text"]
        gen = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                          max_new_tokens=12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        want = gen[:-1] if gen and gen[-1] == tok.eos_token_id else gen
        assert len(want) > 3
        assert got["greedy"] == want, prompt["text"]
        text = tok.decode(want, skip_special_tokens=True)
        assert got["text"] == text
        # llama-cpp-python's chat completion (the GGUF's own template) never returns part of a UTF-8 character,
        # where decode() writes U+FFFD: it drops such bytes, or, when max_tokens cuts a character, generates on
        # past the limit until it is whole (its multibyte_fix); so at most the last character differs
        whole = text.replace("\ufffd", "")
        assert got["chat_text"] == whole or (text.endswith("\ufffd") and len(got["chat_text"]) == len(whole) + 1
                                             and got["chat_text"].startswith(whole)), (got["chat_text"], text)
