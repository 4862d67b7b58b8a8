"""MiniMind-3's architecture as options of our one model: logits equal to transformers' Qwen3 (dense) and
Qwen3-MoE (top-1 MoE, no shared expert) on the same weights, its bare .pth files load, --arch minimind3
trains and exports as Qwen3ForCausalLM, and MiniMind2's defaults are untouched. Where MiniMind-3's own code
is on this machine (/work/shared/anchor, absent in CI) the logits and the MoE aux loss are compared with it too."""
import argparse
import importlib.util
import json
import os

import pytest
import torch

from conftest import run_script
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, minimind3_options
from trainer_utils import load_weights, model_config_from_args

ANCHOR = "/work/shared/anchor/minimind3/model/model_minimind.py"
VOCAB = 300


def minimind3(use_moe=False, hidden=64, seed=0):
    torch.manual_seed(seed)
    # a wide init spread makes greedy choices clear-cut (no near-ties)
    config = MiniMindConfig(**dict(minimind3_options(hidden), hidden_size=hidden, num_hidden_layers=2, vocab_size=VOCAB,
                                   use_moe=use_moe, initializer_range=0.3))
    return MiniMindForCausalLM(config).eval()


def qwen3_moe_reference(model):
    """transformers' Qwen3MoeForCausalLM holding `model`'s weights (its experts are stored fused)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    c = model.config
    ref_config = Qwen3MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps, num_experts=c.n_routed_experts, num_experts_per_tok=c.num_experts_per_tok,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
    ref = Qwen3MoeForCausalLM(ref_config).eval()
    ours = model.state_dict()
    sd = {k: v for k, v in ours.items() if ".mlp.experts." not in k}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        experts = range(c.n_routed_experts)
        sd[f"{p}.gate_up_proj"] = torch.stack([torch.cat([ours[f"{p}.{e}.gate_proj.weight"], ours[f"{p}.{e}.up_proj.weight"]]) for e in experts])
        sd[f"{p}.down_proj"] = torch.stack([ours[f"{p}.{e}.down_proj.weight"] for e in experts])
    ref.load_state_dict(sd, strict=True)
    return ref


def greedy(model, ids, n=12):
    """transformers' greedy tokens, without the eos it keeps (our stream_generate stops before it)."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, eos_token_id=2,
                         pad_token_id=0)[0, ids.shape[1]:].tolist()
    return out[:-1] if out and out[-1] == 2 else out


def test_minimind3_options_are_its_architecture():
    c = MiniMindConfig(**dict(minimind3_options(768), hidden_size=768, use_moe=True))
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.rms_norm_eps) == (8, 4, 2432, 1e-6)
    assert c.qk_norm and (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts) == (4, 1, 0)
    assert c.aux_loss_alpha == 5e-4 and not c.seq_aux
    keys = MiniMindForCausalLM(MiniMindConfig(**dict(minimind3_options(64), hidden_size=64, num_hidden_layers=1,
                                                     use_moe=True))).state_dict()
    assert "model.layers.0.self_attn.q_norm.weight" in keys and "model.layers.0.self_attn.k_norm.weight" in keys
    assert not [k for k in keys if "shared_experts" in k]


def test_minimind2_defaults_are_unchanged():
    c = MiniMindConfig()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (512, 8, 8, 2)
    assert (c.intermediate_size, c.head_dim, c.rms_norm_eps, c.rope_theta, c.qk_norm) == (1408, 64, 1e-5, 1e6, False)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts, c.aux_loss_alpha, c.seq_aux) == (4, 2, 1, 0.1, True)
    assert not c.norm_top1_prob and c.moe_intermediate_size == 1408
    args = argparse.Namespace(dim=512, n_layers=8, n_heads=8, n_kv_heads=None, use_moe=False, dropout=0.0, arch="minimind2")
    assert model_config_from_args(args).to_dict() == c.to_dict()
    keys = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4)).state_dict()
    assert not [k for k in keys if "norm" in k and "self_attn" in k]


def test_dense_minimind3_is_transformers_qwen3():
    from transformers import Qwen3ForCausalLM
    model = minimind3()
    ref = Qwen3ForCausalLM(model.config.to_qwen3_config()).eval()
    ref.load_state_dict(model.state_dict(), strict=True)  # same keys, same shapes
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)
    want = list(model.stream_generate(ids[:1], max_new_tokens=12, temperature=0))
    assert len(want) > 4 and greedy(ref, ids[:1]) == want


def test_minimind3_moe_is_transformers_qwen3_moe():
    model = minimind3(use_moe=True)
    ref = qwen3_moe_reference(model)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # top-1 with renormalisation: the chosen expert's output is not scaled by its gate probability
    # (MiniMind2's rule, which scales it, gives other logits)
    model.config.norm_top1_prob = False
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, b, atol=1e-3)


def minimind3_layout_pth(model, path):
    """Save as MiniMind-3's trainer does: fp16 state dict with both tied keys, no config beside it."""
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return str(path)


@pytest.mark.parametrize("use_moe", [False, True])
def test_bare_minimind3_pth_loads_with_sizes_from_its_shapes(tmp_path, capsys, use_moe):
    from transformers import Qwen3ForCausalLM
    model = minimind3(use_moe=use_moe, seed=3)
    path = minimind3_layout_pth(model, tmp_path / f"full_sft_64{'_moe' if use_moe else ''}.pth")
    # the flags say MiniMind2 sizes; the file's QK-norm weights say MiniMind-3 and its shapes say the rest
    flags = argparse.Namespace(dim=64, n_layers=8, n_heads=4, n_kv_heads=2, use_moe=False, dropout=0.0)
    loaded = load_weights(path, flags).eval()
    assert "MiniMind-3" in capsys.readouterr().out
    c = loaded.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.qk_norm, c.use_moe) == (2, 8, 4, True, use_moe)
    half = {k: v.half().float() for k, v in model.state_dict().items()}
    if use_moe:
        model.load_state_dict(half)
        ref = qwen3_moe_reference(model)
    else:
        ref = Qwen3ForCausalLM(model.config.to_qwen3_config()).eval()
        ref.load_state_dict(half)
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ref(ids).logits, atol=1e-5)


@pytest.mark.skipif(not os.path.exists(ANCHOR), reason="MiniMind-3's own code is not on this machine (it is not in CI)")
@pytest.mark.parametrize("use_moe", [False, True])
def test_equal_to_minimind3_own_code(tmp_path, use_moe):
    spec = importlib.util.spec_from_file_location("minimind3_reference", ANCHOR)
    mm3 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mm3)
    torch.manual_seed(5)
    ref = mm3.MiniMindForCausalLM(mm3.MiniMindConfig(hidden_size=64, num_hidden_layers=2, use_moe=use_moe, vocab_size=VOCAB))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    path = str(tmp_path / "full_sft_64.pth")
    torch.save({k: v.half() for k, v in ref.state_dict().items()}, path)  # what its trainer writes
    ref.load_state_dict(torch.load(path))
    ours = load_weights(path, argparse.Namespace(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, use_moe=use_moe, dropout=0.0))
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(6))
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, ours(ids).logits, atol=1e-5)
    ref.train(), ours.train()
    a, b = ref(ids), ours(ids)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert torch.allclose(a.aux_loss, b.aux_loss, rtol=1e-5, atol=0)
    if use_moe:
        assert b.aux_loss.item() > 0
    # its transformers folder (its own config.json field names) converts to the same model
    from scripts.convert_model import load_transformers_dir
    ref.eval().save_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, load_transformers_dir(str(tmp_path / "hf"))(ids).logits, atol=1e-5)


def test_minimind3_config_json_maps_onto_our_options():
    """A config.json as MiniMind-3's code writes it (Qwen3-MoE spellings, no qk_norm field: it is always on)."""
    from scripts.convert_model import minimind_config_from_hf
    cfg = {"model_type": "minimind", "hidden_size": 64, "num_hidden_layers": 2, "use_moe": True, "num_attention_heads": 8,
           "num_key_value_heads": 4, "head_dim": 8, "intermediate_size": 256, "moe_intermediate_size": 256,
           "num_experts": 4, "num_experts_per_tok": 1, "norm_topk_prob": True, "router_aux_loss_coef": 5e-4,
           "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_scaling": None, "vocab_size": 6400, "dropout": 0.0}
    c = minimind_config_from_hf(cfg, "config.json")
    assert c.qk_norm and c.norm_top1_prob and (c.n_routed_experts, c.n_shared_experts, c.aux_loss_alpha) == (4, 0, 5e-4)
    assert not c.seq_aux and c.head_dim == 8 and c.moe_intermediate_size == 256


def test_arch_flag_trains_minimind3_and_it_exports_as_qwen3(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM
    from scripts.convert_model import main as convert
    data = tmp_path / "pretrain.jsonl"
    data.write_text("".join(json.dumps({"text": "人工智能是计算机科学的一个分支。" * 3}, ensure_ascii=False) + "\n" for _ in range(8)),
                    encoding="utf-8")
    proc = run_script("train_pretrain.py", "--arch", "minimind3", "--dim", "64", "--n_layers", "2", "--device", "cpu",
                      "--num_workers", "0", "--batch_size", "2", "--max_steps", "2", "--accumulation_steps", "1",
                      "--max_seq_len", "32", "--data_path", data, "--out_dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = str(tmp_path / "pretrain_64.pth")
    with open(path[:-4] + ".json") as f:
        cfg = json.load(f)
    assert cfg["qk_norm"] and (cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["rms_norm_eps"]) == (4, 256, 1e-6)
    convert(["--weight", path, "--save_dir", str(tmp_path / "hf")])
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(hf) is Qwen3ForCausalLM
    native = load_weights(path).eval()
    ids = torch.randint(3, 6400, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.allclose(native(ids).logits, hf(ids).logits, atol=1e-5)
    # and back: the Qwen3 folder converts to the same native weights
    back = str(tmp_path / "back" / "pretrain_64.pth")
    convert(["--to_native", "--model_path", str(tmp_path / "hf"), "--weight", back])
    a, b = torch.load(path, weights_only=True), torch.load(back, weights_only=True)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with open(path[:-4] + ".json") as f, open(back[:-4] + ".json") as g:
        trained, converted = json.load(f)["tokenizer"], json.load(g)["tokenizer"]
    assert converted["path"] == str(tmp_path / "hf") and converted["fingerprint"] == trained["fingerprint"]
