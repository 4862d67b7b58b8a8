"""Model tests: each would fail on a wrongly built Transformer."""
import pytest
import torch
import torch.nn.functional as F

from conftest import ON_CPU_AND_CUDA
from model.model_lora import LoRAError, apply_lora, load_lora, merge_lora, save_lora, unmerge_lora
from model.model_minimind import (PRESETS, MiniMindConfig, MiniMindForCausalLM, count_parameters, document_key_starts,
                                  output_cache, sample_next_token, smear_keys, stream_text)

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
            max_position_embeddings=256)
TINY_MOE = dict(TINY, use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)


# smeared keys (each key mixed with the previous token's) change what the cache and the masks must get right
VARIANTS = ["dense", "moe", "smeared_keys"]


def tiny_variant(variant, seed=0):
    return tiny(variant == "moe", seed=seed, smeared_keys=variant == "smeared_keys")


def tiny(moe=False, seed=0, **kw):
    """initializer_range 0.2: large enough weights that every output depends on the whole context (with
    the default 0.02 a random model's next token mostly echoes the current one, hiding cache bugs)."""
    torch.manual_seed(seed)
    kw.setdefault("initializer_range", 0.2)
    return MiniMindForCausalLM(MiniMindConfig(**(TINY_MOE if moe else TINY), **kw)).eval()


def greedy_without_cache(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("preset,expected", [("26M", 25.83e6), ("104M", 104.03e6), ("145M-MoE", 145.03e6)])
def test_parameter_counts(preset, expected):
    with torch.device("meta"):
        model = MiniMindForCausalLM(MiniMindConfig(**PRESETS[preset]))
    assert abs(count_parameters(model) - expected) < 0.05e6


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant):
    model = tiny_variant(variant)
    x = torch.randint(3, 300, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 7) % 300
    a, b = model(x).logits, model(y).logits
    # MoE experts see other token batches when token 9 changes: float noise ~1e-6, not leakage
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-5)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-3)


@ON_CPU_AND_CUDA
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_full_forward(variant, device):
    model = tiny_variant(variant).to(device)
    x = torch.randint(3, 300, (2, 20)).to(device)
    # float32 on both; CUDA's matmul and attention kernels block the sums differently for 1 and 20 query rows
    tol = 1e-5 if device == "cpu" else 1e-4
    full = model(x).logits
    out = model(x[:, :12], use_cache=True)
    steps = [out.logits]
    past = output_cache(out)
    for t in range(12, 20):
        out = model(x[:, t:t + 1], past_key_values=past, use_cache=True)
        past = output_cache(out)
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=tol)
    # a multi-token chunk on top of a cache (chunked prefill) too
    out = model(x[:, :7], use_cache=True)
    out2 = model(x[:, 7:], past_key_values=output_cache(out), use_cache=True)
    assert torch.allclose(out2.logits, full[:, 7:], atol=tol)


def test_gqa_equals_mha_with_repeated_kv():
    gqa = tiny()
    mha = MiniMindForCausalLM(MiniMindConfig(**dict(TINY, num_key_value_heads=4))).eval()
    sd = gqa.state_dict()
    rep, hd = 2, gqa.config.head_dim
    for k in list(sd):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            w = sd[k].view(gqa.config.num_key_value_heads, hd, -1)
            sd[k] = w.repeat_interleave(rep, dim=0).reshape(-1, w.shape[-1])
    mha.load_state_dict(sd, strict=True)
    x = torch.randint(3, 300, (2, 12))
    assert torch.allclose(gqa(x).logits, mha(x).logits, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_generation_equals_single(variant):
    model = tiny_variant(variant, seed=1)
    prompts = [torch.randint(3, 300, (n,)) for n in (5, 9)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert batch[i, width:].tolist() == single[0, len(p):].tolist()
        assert single.tolist() == greedy_without_cache(model, p[None], 8).tolist()


@ON_CPU_AND_CUDA
@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_with_and_without_cache(variant, device):
    model = tiny_variant(variant, seed=2).to(device)
    x = torch.randint(3, 300, (1, 6)).to(device)
    a = model.generate(x, max_new_tokens=10, do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    b = model.generate(x, max_new_tokens=10, do_sample=False, use_cache=False, eos_token_id=None, pad_token_id=0)
    assert a.tolist() == b.tolist() and a.shape[1] == 16
    assert a.tolist() == greedy_without_cache(model, x, 10).tolist()
    # the context matters: another prefix gives another continuation
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % 300
    assert greedy_without_cache(model, y, 10)[0, 6:].tolist() != a[0, 6:].tolist()
    # sampling runs too, and our own streaming loop gives the same greedy tokens
    torch.manual_seed(0)
    model.generate(x, max_new_tokens=5, do_sample=True, top_p=0.9, temperature=0.8, eos_token_id=None, pad_token_id=0)
    ours = list(model.stream_generate(x, max_new_tokens=10, temperature=0, eos_token_id=-1))
    assert ours == a[0, 6:].tolist()


def test_moe_aux_loss_gradient_and_train_eval_equality():
    model = tiny(moe=True)
    x = torch.randint(3, 300, (2, 16))
    model.train()
    out = model(x, labels=x)
    assert out.aux_loss.item() > 0
    (out.loss + out.aux_loss).backward()
    gate_grad = model.model.layers[0].mlp.gate.weight.grad
    assert gate_grad is not None and gate_grad.abs().sum() > 0
    train_logits = model(x).logits
    model.eval()
    assert torch.equal(train_logits, model(x).logits)


def test_moe_matches_naive_per_token_reference():
    """The sorted dispatch computes sum_k w_k * expert_k(x) + shared(x) for every token."""
    model = tiny(moe=True)
    moe = model.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    idx, w, _ = moe.gate(x)
    ref = torch.zeros(10, 64)
    flat = x.view(-1, 64)
    for t in range(10):
        for j in range(2):
            ref[t] += w[t, j] * moe.experts[int(idx[t, j])](flat[t])
        ref[t] += moe.shared_experts[0](flat[t])
    assert torch.allclose(moe(x).view(-1, 64), ref, atol=1e-5)


def test_llama_parity():
    from transformers import LlamaForCausalLM
    model = tiny()
    llama = LlamaForCausalLM(model.config.to_llama_config()).eval()
    missing, unexpected = llama.load_state_dict(model.state_dict(), strict=True)
    x = torch.randint(3, 300, (2, 17))
    assert torch.allclose(llama(x).logits, model(x).logits, atol=1e-4)


def test_save_pretrained_round_trip(tmp_path):
    for moe in (False, True):
        model = tiny(moe)
        model.save_pretrained(tmp_path / str(moe))
        again = MiniMindForCausalLM.from_pretrained(tmp_path / str(moe)).eval()
        for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
            assert k == k2 and torch.equal(a, b)
        x = torch.randint(3, 300, (1, 9))
        assert torch.allclose(model(x).logits, again(x).logits, atol=1e-5)  # bit-equal weights above
        assert again.config.use_moe == moe


def minimind2_keys(cfg):
    """State-dict keys and shapes exactly as MiniMind2's reference model.py names them."""
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    keys = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,), "lm_head.weight": (cfg.vocab_size, H)}
    ffn = lambda p: {f"{p}.gate_proj.weight": (I, H), f"{p}.up_proj.weight": (I, H), f"{p}.down_proj.weight": (H, I)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}"
        keys.update({f"{p}.self_attn.q_proj.weight": (H, H), f"{p}.self_attn.k_proj.weight": (kv, H),
                     f"{p}.self_attn.v_proj.weight": (kv, H), f"{p}.self_attn.o_proj.weight": (H, H),
                     f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,)})
        if cfg.use_moe:
            keys[f"{p}.mlp.gate.weight"] = (cfg.n_routed_experts, H)
            for e in range(cfg.n_routed_experts):
                keys.update(ffn(f"{p}.mlp.experts.{e}"))
            for e in range(cfg.n_shared_experts):
                keys.update(ffn(f"{p}.mlp.shared_experts.{e}"))
        else:
            keys.update(ffn(f"{p}.mlp"))
    return keys


@pytest.mark.parametrize("moe", [False, True])
def test_minimind2_state_dict_layout_loads_strictly(moe):
    model = tiny(moe)
    keys = minimind2_keys(model.config)
    torch.manual_seed(3)
    emb = torch.randn(300, 64)
    sd = {k: (emb if k in ("lm_head.weight", "model.embed_tokens.weight") else torch.randn(shape)) for k, shape in keys.items()}
    model.load_state_dict(sd, strict=True)
    assert set(model.state_dict()) == set(keys)
    assert torch.equal(model.lm_head.weight, emb)


@pytest.mark.parametrize("field,kw", [
    ("num_attention_heads", dict(hidden_size=64, num_attention_heads=5)),
    ("num_key_value_heads", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)),
    ("num_experts_per_tok", dict(use_moe=True, n_routed_experts=2, num_experts_per_tok=3)),
])
def test_bad_config_names_the_field(field, kw):
    with pytest.raises(ValueError, match=field):
        MiniMindConfig(**kw)


@pytest.mark.parametrize("smeared_keys", [False, True])
def test_packed_documents_do_not_attend_across(smeared_keys):
    model = tiny(smeared_keys=smeared_keys)
    a, b = torch.randint(3, 300, (1, 7)), torch.randint(3, 300, (1, 5))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    out = model(packed, position_ids=pos, packed=True).logits
    assert torch.allclose(out[:, :7], model(a).logits, atol=1e-5)
    assert torch.allclose(out[:, 7:], model(b).logits, atol=1e-5)


def test_smeared_keys_mix_in_the_previous_token_and_start_as_a_copier():
    model = tiny(smeared_keys=True)
    # the previous token changes the keys of the next: with the mix switched off (own key only), it does not
    x = torch.randint(3, 300, (1, 10))
    y = x.clone()
    y[0, 4] = (y[0, 4] + 1) % 300
    attn = model.model.layers[0].self_attn
    def keys(ids, own_only=False):
        captured = {}
        hook = attn.register_forward_hook(lambda m, a, out: captured.update(k=out[1][0]))
        with torch.no_grad():
            model(ids)
            hook.remove()
            k = captured["k"]  # the cache's plain keys, after RoPE
            logit = torch.full_like(attn.key_smear, 30.0) if own_only else attn.key_smear
            return smear_keys(k, document_key_starts(None, torch.arange(10)[None], 10, False), logit)
    assert not torch.allclose(keys(x)[:, :, 5], keys(y)[:, :, 5], atol=1e-4)
    assert torch.allclose(keys(x, own_only=True)[:, :, 5], keys(y, own_only=True)[:, :, 5], atol=1e-5)
    # a new model's heads start as copiers: queries = keys, output = values transposed, keys mostly the previous token's
    rep = attn.n_heads // attn.n_kv_heads
    k_per_q = attn.k_proj.weight.view(attn.n_kv_heads, 1, attn.head_dim, -1).expand(-1, rep, -1, -1).reshape(attn.q_proj.weight.shape)
    v_per_q = attn.v_proj.weight.view(attn.n_kv_heads, 1, attn.head_dim, -1).expand(-1, rep, -1, -1).reshape(attn.q_proj.weight.shape)
    assert torch.equal(attn.q_proj.weight, k_per_q) and torch.equal(attn.o_proj.weight, v_per_q.t())
    assert torch.allclose(torch.sigmoid(attn.key_smear), torch.tensor(0.1192), atol=1e-4)
    assert "self_attn.key_smear" not in " ".join(tiny().state_dict())  # off by default: the Llama layout


def random_documents(batch, length, seed):
    """position_ids of `batch` rows of `length` tokens, each cut into 1-4 documents at random places."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cuts = sorted(set(torch.randint(1, length, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g).tolist()))
        rows.append(torch.cat([torch.arange(b - a) for a, b in zip([0, *cuts], [*cuts, length])]))
    return torch.stack(rows)


def test_flex_document_mask_equals_the_dense_mask():
    """Packed training on CUDA attends through FlexAttention's block mask; it must allow exactly what the dense
    mask allows (causal, within a document). Forward only and uncompiled: on the CPU flex_attention has no
    backward, and inductor's CPU template fails to build for some dynamic shapes (CUDA builds a Triton kernel)."""
    from torch.nn.attention.flex_attention import flex_attention

    from model.model_minimind import build_attention_mask, document_block_mask
    for batch, length, seed in [(3, 70, 0), (2, 130, 1)]:
        g = torch.Generator().manual_seed(seed)
        q, k, v = torch.randn(batch, 4, length, 16, generator=g), *torch.randn(2, batch, 2, length, 16, generator=g)
        pos = random_documents(batch, length, seed)
        with torch.no_grad():
            flex = flex_attention(q, k, v, block_mask=document_block_mask(pos), enable_gqa=True)
        dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                               attn_mask=build_attention_mask(None, pos, length, 0, packed=True))
        assert torch.allclose(flex, dense, atol=1e-5)


@pytest.mark.cuda
def test_flex_packed_training_equals_the_dense_mask_on_cuda(monkeypatch):
    """The packed forward and backward a training step runs on CUDA (FlexAttention) give the dense-mask SDPA
    path's loss and gradients, over batches of changing shape (packed batches vary in rows and length)."""
    import model.model_minimind as mm
    model = tiny().train().cuda()
    for batch, length, seed in [(3, 70, 0), (5, 128, 1), (2, 97, 2)]:
        x = torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(seed)).cuda()
        pos = random_documents(batch, length, seed).cuda()
        results = {}
        for kind in ("sdpa", "flex"):
            monkeypatch.setattr(mm, "PACKED_ATTENTION", kind)
            model.zero_grad(set_to_none=True)
            loss = model(x, labels=x, position_ids=pos, packed=True).loss
            loss.backward()
            results[kind] = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])
        assert abs(results["flex"][0] - results["sdpa"][0]) < 1e-4
        assert torch.allclose(results["flex"][1], results["sdpa"][1], atol=1e-4, rtol=1e-3)


def test_yarn_scaling_interpolates_only_low_frequencies():
    from model.model_minimind import rope_inv_freq
    cfg = dict(TINY, max_position_embeddings=32768)
    base = MiniMindForCausalLM(MiniMindConfig(**cfg)).eval()
    yarn = MiniMindForCausalLM(MiniMindConfig(**cfg, inference_rope_scaling=True)).eval()
    yarn.load_state_dict(base.state_dict())
    assert yarn.config.yarn_scaling["type"] == "yarn"
    f0, _ = rope_inv_freq(base.config)
    f1, _ = rope_inv_freq(yarn.config)
    assert torch.equal(f0[0], f1[0])  # the fastest-rotating dimension is extrapolated unchanged
    assert torch.allclose(f1[-1], f0[-1] / 16)  # the slowest is interpolated by the factor
    x = torch.randint(3, 300, (1, 40))
    a, b = base(x).logits, yarn(x).logits
    assert torch.isfinite(b).all() and not torch.equal(a, b)
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-6)  # position 0 has no rotation either way


def lora_model():
    model = tiny()
    apply_lora(model, rank=4)
    return model


def test_lora_zero_b_changes_nothing_and_merge_is_exact(tmp_path):
    base = tiny()
    model = lora_model()
    x = torch.randint(3, 300, (2, 10))
    assert torch.equal(model(x).logits, base(x).logits)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    unmerged = model(x).logits
    assert not torch.allclose(unmerged, base(x).logits, atol=1e-4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    assert torch.allclose(model(x).logits, unmerged, atol=1e-5)
    merge_lora(model)  # twice: harmless
    assert torch.allclose(model(x).logits, unmerged, atol=1e-5)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # save / load into a fresh base
    save_lora(model, tmp_path / "a.pth")
    fresh = tiny()
    load_lora(fresh, tmp_path / "a.pth")
    assert torch.allclose(fresh(x).logits, unmerged, atol=1e-6)


def test_lora_targets_include_gqa_kv_and_load_is_strict(tmp_path):
    model = lora_model()
    k = model.model.layers[0].self_attn.k_proj
    assert k.lora_B.shape == (32, 4) and k.lora_A.shape == (4, 64)
    save_lora(model, tmp_path / "a.pth")
    other = MiniMindForCausalLM(MiniMindConfig(**dict(TINY, hidden_size=32))).eval()
    with pytest.raises(LoRAError, match="shape"):
        load_lora(other, tmp_path / "a.pth")
    wrong_targets = tiny()
    apply_lora(wrong_targets, rank=4, targets=("gate_proj",))
    with pytest.raises(LoRAError, match="targets"):
        load_lora(wrong_targets, tmp_path / "a.pth")


def test_sampling_helpers():
    logits = torch.tensor([1.0, 5.0, 2.0, 4.9])
    assert sample_next_token(logits.clone(), [], temperature=0) == 1
    assert sample_next_token(logits.clone(), [1], temperature=0, repetition_penalty=2.0) == 3
    g = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits.clone(), [], temperature=1.0, top_k=2, generator=g) for _ in range(50)}
    assert draws <= {1, 3}


class ByteTokenizer:
    """Decodes ids as raw UTF-8 bytes: one Chinese character spans three ids."""
    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_text_never_breaks_multibyte_characters():
    text = "你好, world 🙂!"
    pieces = list(stream_text(ByteTokenizer(), list(text.encode("utf-8"))))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_loss_is_mean_over_labelled_tokens_and_zero_without_labels():
    model = tiny()
    x = torch.randint(3, 300, (2, 8))
    labels = x.clone()
    labels[:, :5] = -100
    logits = model(x).logits
    manual = F.cross_entropy(logits[:, 4:-1].reshape(-1, 300), x[:, 5:].reshape(-1))
    assert torch.allclose(model(x, labels=labels).loss, manual, atol=1e-6)
    empty = model(x, labels=torch.full_like(x, -100)).loss  # e.g. a prompt longer than max_seq_len
    assert empty.item() == 0.0
