"""MiniMind: the one decoder-only Transformer every stage trains.

Reads top to bottom: config -> RMSNorm -> RoPE (+YaRN) -> attention (GQA, SDPA, KV cache, smeared keys) -> SwiGLU
feed-forward -> MoE (switched on by `use_moe`) -> block -> model -> causal LM head + generation.

Parameter names follow transformers' Llama (model.embed_tokens, model.layers.N.self_attn.q_proj, ...),
so a dense checkpoint loads into LlamaForCausalLM unchanged, and config fields and MoE keys follow the
published MiniMind2 models (mlp.gate.weight, mlp.experts.N.*, mlp.shared_experts.N.*). MiniMind-3's
architecture is a set of config options (`minimind3_options`: QK-norm as self_attn.q_norm/k_norm, wider
FFN, 4 KV heads, top-1 MoE without shared expert); a dense model with them is transformers' Qwen3.
"""
import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

# transformers renamed the output's KV-cache field from `past_key_values` to `cache` (5.2x); use whichever
# this version has, so neither warns. `output_cache(out)` reads it.
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(out):
    return getattr(out, _CACHE_FIELD)


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------
# MiniMind's `inference_rope_scaling` setting: RoPE stretched 16x past a trained length of 2048 positions.
DEFAULT_YARN = dict(type="yarn", factor=16, original_max_position_embeddings=2048, beta_fast=32.0, beta_slow=1.0,
                    attention_factor=1.0)


class MiniMindConfig(PretrainedConfig):
    model_type = "minimind"

    def __init__(
        self,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 2,
        intermediate_size: int | None = None,  # None: 64 * ceil(8 * hidden / 3 / 64), 1408 at 512
        head_dim: int | None = None,  # None: hidden_size / num_attention_heads
        qk_norm: bool = False,  # RMSNorm on each head's queries and keys before RoPE (MiniMind-3, Qwen3)
        # Each key a learned mix of its own token's key and the previous token's (Olsson et al. 2022's "smeared
        # keys"): one attention layer can then find "the token after an earlier copy of this one", the induction
        # head that in-context copying needs. Not Llama: off by default. See the README, "Smeared keys".
        smeared_keys: bool = False,
        vocab_size: int = 6400,
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 1e6,
        hidden_act: str = "silu",
        dropout: float = 0.0,
        flash_attn: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        # YaRN: stretch RoPE to run beyond the trained length (MiniMind's `inference_rope_scaling`)
        inference_rope_scaling: bool = False,
        rope_scaling: dict | None = None,
        # MoE (ignored when use_moe is False)
        use_moe: bool = False,
        num_experts_per_tok: int = 2,
        n_routed_experts: int = 4,
        n_shared_experts: int = 1,
        scoring_func: str = "softmax",
        aux_loss_alpha: float = 0.1,
        seq_aux: bool = True,
        norm_topk_prob: bool = True,  # rescale the chosen experts' gate weights to sum to 1 (when more than one)
        norm_top1_prob: bool = False,  # also for a single chosen expert, whose weight becomes 1 (MiniMind-3)
        moe_intermediate_size: int | None = None,  # width of each expert; None: intermediate_size
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        if intermediate_size is None:
            intermediate_size = 64 * ((int(hidden_size * 8 / 3) + 63) // 64)
        self.intermediate_size = intermediate_size
        if head_dim is None and num_attention_heads > 0 and hidden_size % num_attention_heads:
            raise ValueError(f"MiniMindConfig.num_attention_heads={num_attention_heads}: must divide "
                             f"hidden_size={hidden_size} (or set head_dim)")
        self.head_dim = head_dim if head_dim is not None else hidden_size // max(num_attention_heads, 1)
        self.qk_norm = qk_norm
        self.smeared_keys = smeared_keys
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.hidden_act = hidden_act
        self.dropout = dropout
        self.flash_attn = flash_attn
        self.initializer_range = initializer_range
        self.inference_rope_scaling = inference_rope_scaling
        # Stored as `yarn_scaling`: transformers 5 reserves `rope_scaling` for its own RoPE machinery.
        yarn = kwargs.pop("yarn_scaling", None) or rope_scaling
        if inference_rope_scaling and yarn is None:
            yarn = dict(DEFAULT_YARN)
        self.yarn_scaling = yarn
        self.use_moe = use_moe
        self.num_experts_per_tok = num_experts_per_tok
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.norm_topk_prob = norm_topk_prob
        self.norm_top1_prob = norm_top1_prob
        self.moe_intermediate_size = moe_intermediate_size if moe_intermediate_size is not None else intermediate_size
        self.check()  # before transformers' own validators, which fail on wrong types with less clear errors
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def check(self):
        """Clear errors for configs that would otherwise fail deep inside a matmul (a hand-edited or foreign
        config .json can hold anything: strings, floats, negative sizes)."""
        def bad(field, why):
            raise ValueError(f"MiniMindConfig.{field}={getattr(self, field)!r}: {why}")
        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size", "moe_intermediate_size", "head_dim", "vocab_size", "max_position_embeddings",
                      "num_experts_per_tok", "n_routed_experts", "n_shared_experts"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                bad(field, "must be an integer")
            if value <= 0 and field != "n_shared_experts":
                bad(field, "must be positive")
            if value < 0:
                bad(field, "must not be negative")
        for field, low in (("rms_norm_eps", 0.0), ("rope_theta", 0.0), ("dropout", None), ("initializer_range", None),
                           ("aux_loss_alpha", None)):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                bad(field, "must be a finite number")
            if (low is not None and value <= low) or value < 0:
                bad(field, "must be positive" if low is not None else "must not be negative")
        if self.dropout >= 1:
            bad("dropout", "must be below 1")
        for field in ("use_moe", "flash_attn", "seq_aux", "norm_topk_prob", "norm_top1_prob", "qk_norm", "smeared_keys",
                      "inference_rope_scaling"):
            if not isinstance(getattr(self, field), bool):
                bad(field, "must be true or false")
        if self.hidden_act != "silu":
            bad("hidden_act", "only 'silu' is supported")
        if self.yarn_scaling is not None and not isinstance(self.yarn_scaling, dict):
            bad("yarn_scaling", "must be an object of YaRN settings or null")
        if self.head_dim % 2:
            bad("head_dim", "must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.use_moe:
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                bad("num_experts_per_tok", f"must be between 1 and n_routed_experts={self.n_routed_experts}")
            if self.scoring_func != "softmax":
                bad("scoring_func", "only 'softmax' is supported")

    def _dense_hf_fields(self):
        """The fields a transformers Llama or Qwen3 config shares with ours (tied embeddings, no biases)."""
        return dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=True, attention_bias=False,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)

    def to_llama_config(self):
        """The transformers LlamaConfig whose LlamaForCausalLM takes a dense MiniMind state dict as is."""
        from transformers import LlamaConfig
        if self.use_moe or self.yarn_scaling or self.qk_norm or self.smeared_keys:
            raise ValueError("only a dense model without YaRN, QK-norm or smeared keys maps onto LlamaForCausalLM")
        return LlamaConfig(**self._dense_hf_fields(), mlp_bias=False)

    def to_qwen3_config(self):
        """The transformers Qwen3Config whose Qwen3ForCausalLM takes a dense QK-norm (MiniMind-3) state dict as is."""
        from transformers import Qwen3Config
        if self.use_moe or self.yarn_scaling or self.smeared_keys or not self.qk_norm:
            raise ValueError("only a dense model with QK-norm and without YaRN or smeared keys maps onto Qwen3ForCausalLM")
        return Qwen3Config(**self._dense_hf_fields(), use_sliding_window=False)


def minimind3_options(hidden_size: int) -> dict:
    """MiniMind-3's architecture as options of this model (MiniMind2's are the defaults): QK-norm, FFN
    width 64*ceil(pi*hidden/64), 8 query / 4 KV heads, RMSNorm eps 1e-6; its MoE routes each token to 1 of
    4 experts (no shared expert; the chosen expert's output is not scaled by its gate probability) with a
    token-level load-balancing loss of weight 5e-4."""
    return dict(num_attention_heads=8, num_key_value_heads=4, intermediate_size=64 * math.ceil(hidden_size * math.pi / 64),
                rms_norm_eps=1e-6, qk_norm=True, n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=0,
                norm_top1_prob=True, aux_loss_alpha=5e-4, seq_aux=False)


# MiniMind-3's config.json spells two MoE fields the Qwen3-MoE way.
MINIMIND3_FIELD_NAMES = {"num_experts": "n_routed_experts", "router_aux_loss_coef": "aux_loss_alpha"}


def is_minimind3_config(cfg: dict) -> bool:
    """A config dict written by MiniMind-3's own code (it has no qk_norm field: QK-norm is always on there)."""
    return "qk_norm" not in cfg and any(k in cfg for k in ("router_aux_loss_coef", "num_experts", "moe_intermediate_size"))


def config_from_minimind3(cfg: dict, **overrides) -> "MiniMindConfig":
    """MiniMindConfig for a config dict saved by MiniMind-3's code: its defaults, then its fields."""
    fields = {MINIMIND3_FIELD_NAMES.get(k, k): v for k, v in cfg.items()}
    options = minimind3_options(fields.get("hidden_size", 768))
    options.update(hidden_size=768, num_hidden_layers=8)
    options.update({k: v for k, v in fields.items() if k != "rope_scaling" or v})
    options.update(overrides)
    return MiniMindConfig(**options)


def is_minimind3_state_dict(sd: dict) -> bool:
    """MiniMind-3's weights carry QK-norm (self_attn.q_norm/k_norm); MiniMind2's never do."""
    return any(k.endswith("self_attn.q_norm.weight") for k in sd)


def config_from_minimind3_state_dict(sd: dict, **overrides) -> "MiniMindConfig":
    """The MiniMind-3 model a bare .pth (no config beside it) holds: every size is read off the tensor shapes;
    the rest (RoPE theta, eps, top-1 routing) are MiniMind-3's defaults."""
    layer = "model.layers.0."
    vocab_size, hidden_size = sd["model.embed_tokens.weight"].shape
    head_dim = sd[layer + "self_attn.q_norm.weight"].shape[0]
    fields = dict(hidden_size=hidden_size, vocab_size=vocab_size, head_dim=head_dim,
                  num_hidden_layers=len({k.split(".")[2] for k in sd if k.startswith("model.layers.")}),
                  num_attention_heads=sd[layer + "self_attn.q_proj.weight"].shape[0] // head_dim,
                  num_key_value_heads=sd[layer + "self_attn.k_proj.weight"].shape[0] // head_dim,
                  use_moe=layer + "mlp.gate.weight" in sd)
    if fields["use_moe"]:
        fields["num_experts"] = sd[layer + "mlp.gate.weight"].shape[0]
        fields["intermediate_size"] = sd[layer + "mlp.experts.0.gate_proj.weight"].shape[0]
    else:
        fields["intermediate_size"] = sd[layer + "mlp.gate_proj.weight"].shape[0]
    return config_from_minimind3(fields, **overrides)


# The named sizes of MiniMind2. Parameter counts (tied embeddings): 25.83M, 104.03M, 145.03M.
PRESETS = {
    "26M": dict(hidden_size=512, num_hidden_layers=8),
    "104M": dict(hidden_size=768, num_hidden_layers=16),
    "145M-MoE": dict(hidden_size=640, num_hidden_layers=8, use_moe=True),
}


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (bf16 squares lose precision), cast back, then scale: the Llama/MiniMind order.
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def rope_inv_freq(config: MiniMindConfig, device=None):
    """RoPE frequencies, with YaRN's ramp between interpolation and extrapolation when configured."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    attn_factor = 1.0
    yarn = config.yarn_scaling
    if yarn:
        orig_max, factor = yarn.get("original_max_position_embeddings", 2048), yarn.get("factor", 16)
        beta_fast, beta_slow = yarn.get("beta_fast", 32.0), yarn.get("beta_slow", 1.0)
        attn_factor = yarn.get("attention_factor", 1.0)
        if config.max_position_embeddings > orig_max:
            # Dimensions that rotate fewer than beta_slow times over orig_max are interpolated by `factor`,
            # those rotating more than beta_fast times are kept, a linear ramp in between.
            def dim_of(rotations):
                return dim * math.log(orig_max / (rotations * 2 * math.pi)) / (2 * math.log(base))
            low = max(math.floor(dim_of(beta_fast)), 0)
            high = min(math.ceil(dim_of(beta_slow)), dim // 2 - 1)
            ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
            inv_freq = inv_freq * (1 - ramp + ramp / factor)
    return inv_freq, attn_factor


def rope_cos_sin(position_ids, config: MiniMindConfig):
    """cos/sin [B, T, head_dim] for explicit positions (they restart per document when packing)."""
    inv_freq, attn_factor = rope_inv_freq(config, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim/2], fp32 whatever the autocast
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * attn_factor, emb.sin() * attn_factor


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """x [B, H, T, D]; rotate-half layout (Llama), computed in fp32."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        if config.smeared_keys:  # per KV head: the share of a key that is its own token's is sigmoid(key_smear)
            self.key_smear = nn.Parameter(torch.zeros(self.n_kv_heads))
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, attn_mask=None, past_key_value=None, key_starts=None):
        """attn_mask: None (plain causal), a bool [B, 1, Tq, Tk] mask, True where attention is allowed, or a
        FlexAttention BlockMask (packed training on CUDA).
        past_key_value: None, a (k, v) tuple, or a transformers Cache. Returns (out, (k, v)).
        key_starts: bool [B, Tk], True where a key has no previous token in its document (smeared keys only)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if isinstance(past_key_value, Cache):
            k, v = past_key_value.update(k, v, self.layer_idx)
        elif past_key_value is not None:
            k, v = torch.cat([past_key_value[0], k], dim=2), torch.cat([past_key_value[1], v], dim=2)
        present = (k, v)  # the cache keeps plain keys; each step smears the whole key sequence again
        if key_starts is not None:
            k = smear_keys(k, key_starts, self.key_smear)
        dropout_p = self.dropout if self.training else 0.0
        if isinstance(attn_mask, BlockMask):
            out = packed_flex_attention(q, k, v, attn_mask)
        elif attn_mask is None:
            # Causal with no padding: SDPA picks the flash kernel on CUDA; enable_gqa shares K/V heads
            # without materialising the repeats.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1, enable_gqa=True)
        else:
            # The memory-efficient kernel takes masks but not GQA: repeat K/V here.
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.o_proj(out)), present


def smear_keys(k, key_starts, smear_logit):
    """k [B, H, Tk, D] (after RoPE) -> a * k_j + (1 - a) * k_{j-1} per head, a = sigmoid(smear_logit); a key
    with no previous token in its document (key_starts) stays as it is."""
    a = torch.sigmoid(smear_logit).view(1, -1, 1, 1).to(k.dtype)
    prev = torch.cat([k[:, :, :1], k[:, :, :-1]], dim=2)
    prev = torch.where(key_starts[:, None, :, None], k, prev)
    return a * k + (1 - a) * prev


def document_key_starts(attention_mask, position_ids, k_len, packed):
    """bool [B, Tk]: True for keys with no previous token of their own document. A packed row restarts its
    positions at each document; a left-padded row starts at its first real token."""
    if packed:
        return position_ids == 0
    if attention_mask is not None:
        real = attention_mask[:, :k_len].bool()
        return ~torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1)
    starts = torch.zeros(position_ids.shape[0], k_len, dtype=torch.bool, device=position_ids.device)
    starts[:, 0] = True
    return starts


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    def __init__(self, config: MiniMindConfig, intermediate_size: int | None = None):
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


# ----------------------------------------------------------------------------------------------------
# Mixture of experts (use_moe=True): softmax gate, top-k routed experts + always-on shared experts
# (MiniMind2: top-2 of 4 + 1 shared; MiniMind-3: top-1 of 4, none shared)
# ----------------------------------------------------------------------------------------------------
class MoEGate(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x):
        """x [B, T, H] -> topk_idx [B*T, k], topk_weight [B*T, k], aux_loss (scalar)."""
        cfg = self.config
        B, T, H = x.shape
        scores = F.linear(x.reshape(-1, H), self.weight).float().softmax(dim=-1)  # [N, E]
        topk_weight, topk_idx = torch.topk(scores, k=cfg.num_experts_per_tok, dim=-1, sorted=False)
        if cfg.norm_topk_prob and (cfg.num_experts_per_tok > 1 or cfg.norm_top1_prob):
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        aux_loss = scores.new_zeros(())
        if self.training and cfg.aux_loss_alpha > 0:
            E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
            if cfg.seq_aux:
                # Per sequence: (fraction of routed slots per expert * E) . (mean gate prob per expert)
                counts = torch.zeros(B, E, device=x.device).scatter_add_(
                    1, topk_idx.view(B, -1), torch.ones(B, T * k, device=x.device))
                load = counts / (T * k / E)
                aux_loss = (load * scores.view(B, T, E).mean(dim=1)).sum(dim=1).mean() * cfg.aux_loss_alpha
            else:
                load = F.one_hot(topk_idx.view(-1), E).float().mean(0) * E
                aux_loss = (scores.mean(0) * load).sum() * cfg.aux_loss_alpha
        return topk_idx, topk_weight, aux_loss


class MOEFeedForward(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.gate = MoEGate(config)
        self.experts = nn.ModuleList([FeedForward(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts)])
        self.shared_experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_shared_experts)])
        self.aux_loss = None

    def forward(self, x):
        B, T, H = x.shape
        k = self.config.num_experts_per_tok
        topk_idx, topk_weight, self.aux_loss = self.gate(x)
        x_flat = x.reshape(-1, H)
        # Dispatch by sorting the (token, slot) pairs by expert: each expert runs once on a contiguous
        # slice. Training and inference share this path, so both give the same output.
        flat_idx = topk_idx.view(-1)
        order = flat_idx.argsort(stable=True)
        token_of = order // k
        counts = torch.bincount(flat_idx, minlength=len(self.experts)).tolist()
        expert_in = x_flat[token_of].split(counts)
        # Every expert runs (possibly on zero tokens) so all parameters join the graph, which DDP needs.
        expert_out = torch.cat([expert(xi) for expert, xi in zip(self.experts, expert_in)])
        weighted = expert_out.float() * topk_weight.view(-1, 1)[order]
        y = torch.zeros(x_flat.shape, dtype=torch.float32, device=x.device).index_add_(0, token_of, weighted)
        y = y.to(x.dtype).view(B, T, H)
        for expert in self.shared_experts:
            y = y + expert(x)
        return y


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------
class MiniMindBlock(nn.Module):
    def __init__(self, layer_idx: int, config: MiniMindConfig):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MOEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, h, cos, sin, attn_mask=None, past_key_value=None, key_starts=None):
        attn_out, present = self.self_attn(self.input_layernorm(h), cos, sin, attn_mask, past_key_value, key_starts)
        h = h + attn_out
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, present


# Packed training on CUDA masks documents with FlexAttention's block mask: a fused kernel that skips the blocks
# between documents, where the dense bool mask below sends SDPA to its masked kernel with K/V repeated per head.
# MINIMIND_PACKED_ATTENTION=sdpa keeps the dense mask everywhere (if this torch cannot compile flex_attention).
PACKED_ATTENTION = None  # "flex" or "sdpa" here overrides the environment (scripts/bench_train.py compares them)
_compiled_flex = None


def packed_attention_kind():
    """flex or sdpa (trainer_utils.Context refuses any other value before training starts)."""
    return PACKED_ATTENTION or os.environ.get("MINIMIND_PACKED_ATTENTION", "flex")


@functools.cache
def can_compile_for_cuda():
    """torch.compile builds CUDA kernels with Triton, which some installs lack (e.g. Windows wheels)."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def packed_flex_attention(q, k, v, block_mask):
    if torch.compiler.is_compiling():  # inside --compile's graph, inductor builds the fused kernel with the rest
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    global _compiled_flex
    if _compiled_flex is None:  # uncompiled, flex_attention runs a slow reference implementation
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)


def document_block_mask(position_ids):
    """Causal attention within each packed document (position_ids restart at 0 at each document start)."""
    doc = (position_ids == 0).cumsum(dim=-1)
    B, T = doc.shape

    def same_document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc[b, q_idx] == doc[b, kv_idx])
    return create_block_mask(same_document_causal, B, None, T, T, device=doc.device)


def build_attention_mask(attention_mask, position_ids, q_len, past_len, packed):
    """The bool [B, 1, Tq, Tk] mask SDPA needs, or None when plain causal attention is exact.

    attention_mask [B, past_len + q_len]: 1 for real tokens, 0 for padding (left padding in generation).
    packed: position_ids restart at 0 at each document start; tokens attend only within their document.
    """
    if attention_mask is None and not packed and (past_len == 0 or q_len == 1):
        return None
    device = position_ids.device
    k_len = past_len + q_len
    q_pos = torch.arange(past_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, Tq, Tk] causal
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :k_len].bool()
    if packed:
        doc = (position_ids == 0).cumsum(dim=-1)  # document index of each token, [B, T]
        mask = mask & (doc[:, None, :, None] == doc[:, None, None, :])
    # A padding query may see no key at all; let every query see itself so softmax never gets all -inf
    # (those rows are padding and never read).
    mask = mask | (k_pos[None, :] == q_pos[:, None])[None, None]
    return mask


class MiniMindModel(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([MiniMindBlock(i, config) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, position_ids=None, packed=False):
        B, T = input_ids.shape
        if isinstance(past_key_values, Cache):
            past_len = past_key_values.get_seq_length()
            layer_pasts = [past_key_values] * len(self.layers)
        elif past_key_values is not None:
            past_len = past_key_values[0][0].shape[2]
            layer_pasts = list(past_key_values)
        else:
            past_len, layer_pasts = 0, [None] * len(self.layers)
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: real tokens count positions from 0.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:past_len + T]
            else:
                position_ids = torch.arange(past_len, past_len + T, device=input_ids.device).expand(B, T)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: keep the fast causal kernel
        # packed training on CUDA: FlexAttention's block mask (flex_attention has no dropout); else a dense mask or none
        flex = (packed and attention_mask is None and past_len == 0 and input_ids.is_cuda and packed_attention_kind() == "flex"
                and can_compile_for_cuda() and not (self.training and self.config.dropout > 0))
        mask = document_block_mask(position_ids) if flex else build_attention_mask(attention_mask, position_ids, T, past_len, packed)
        cos, sin = rope_cos_sin(position_ids, self.config)
        key_starts = (document_key_starts(attention_mask, position_ids, past_len + T, packed)
                      if self.config.smeared_keys else None)
        h = self.dropout(self.embed_tokens(input_ids))
        presents = []
        for layer, past in zip(self.layers, layer_pasts):
            h, present = layer(h, cos, sin, mask, past, key_starts)
            presents.append(present)
        aux_loss = sum((l.mlp.aux_loss for l in self.layers if isinstance(l.mlp, MOEFeedForward)), h.new_zeros(()))
        return self.norm(h), presents, aux_loss


class MiniMindForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MiniMindConfig
    base_model_prefix = "model"
    _no_split_modules = ["MiniMindBlock"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _supports_sdpa = True

    def __init__(self, config: MiniMindConfig = None):
        config = config or MiniMindConfig()
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.post_init()

    def _init_weights(self, module):
        # GPT-2 style: N(0, 0.02), residual output projections scaled down by depth.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "_is_residual_out", False):
                std = std / math.sqrt(2 * self.config.num_hidden_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, MoEGate):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif isinstance(module, Attention) and self.config.smeared_keys:
            # After its projections (apply() visits children first): start each head as a copier, so that
            # in-context copying needs hundreds of steps, not thousands. Queries equal keys (a token attends to
            # keys that look like itself: the mimetic initialisation of Trockman and Kolter, 2023), the output
            # writes back what the values read (o = v^T, and the embedding is tied to the LM head), and keys
            # start mostly the previous token's (sigmoid(-2) = 0.12 own): attend to the token after an earlier
            # copy of this one, and predict it.
            with torch.no_grad():
                rep = module.n_heads // module.n_kv_heads
                def per_query_head(w):
                    return w.view(module.n_kv_heads, 1, module.head_dim, -1).expand(-1, rep, -1, -1).reshape(module.q_proj.weight.shape)
                module.q_proj.weight.copy_(per_query_head(module.k_proj.weight))
                module.o_proj.weight.copy_(per_query_head(module.v_proj.weight).t())
                module.key_smear.fill_(-2.0)

    def post_init(self):
        for name, module in self.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                module._is_residual_out = True
        super().post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False, labels=None,
                logits_to_keep=0, position_ids=None, packed=False, **kwargs):
        """labels: same shape as input_ids, -100 where no loss; shifted here (token t predicts t+1).
        packed=True: several documents per row, position_ids restart at 0 at each document start."""
        if past_key_values is None:
            past_key_values = kwargs.get("cache")  # transformers >= 5.2x passes the KV cache as `cache`
        h, presents, aux_loss = self.model(input_ids, attention_mask, past_key_values, position_ids, packed)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif not isinstance(logits_to_keep, int):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        if use_cache:
            past = past_key_values if isinstance(past_key_values, Cache) else presents
        else:
            past = None
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits, **{_CACHE_FIELD: past})

    # ------------------------------------------------------------------------------------------------
    # Generation for chat UIs: yields token ids one at a time (see `stream_text` for text pieces).
    # model.generate(...) from transformers works too.
    # ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def stream_generate(self, input_ids, attention_mask=None, max_new_tokens=512, temperature=0.85, top_p=0.85,
                        top_k=0, repetition_penalty=1.0, eos_token_id=None, generator=None, logits_processor=None):
        """One sequence (input_ids [1, T]); temperature 0 is greedy. Stops at eos, which is not yielded.
        logits_processor: called as transformers calls one, (ids so far [1, T'], scores [1, V]) -> scores,
        before sampling (e.g. trainer/tool_guide.py's ToolCallGuide)."""
        eos_token_id = self.config.eos_token_id if eos_token_id is None else eos_token_id
        ids, past = input_ids, None
        seen = input_ids[0].tolist()
        for _ in range(max_new_tokens):
            out = self(ids, attention_mask=attention_mask, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = output_cache(out)
            logits = out.logits[0, -1].float()
            if logits_processor is not None:
                logits = logits_processor(torch.tensor([seen], device=logits.device), logits[None])[0]
            next_id = sample_next_token(logits, seen, temperature, top_p, top_k, repetition_penalty, generator)
            if next_id == eos_token_id:
                return
            yield next_id
            seen.append(next_id)
            ids = torch.tensor([[next_id]], device=input_ids.device)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(1, 1)], dim=1)


def causal_lm_loss(logits, labels):
    """Mean next-token cross-entropy in fp32 over the labelled tokens (-100: none). Shifts the labels, not
    the logits, so the large logits tensor is not copied. A batch without any label (a long prompt cut by
    max_seq_len) gives 0, not NaN."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    total = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets, ignore_index=-100, reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


def sample_next_token(logits, seen_ids, temperature=0.85, top_p=0.85, top_k=0, repetition_penalty=1.0, generator=None):
    """logits [V] fp32 -> next token id (int)."""
    if repetition_penalty != 1.0 and seen_ids:
        idx = torch.tensor(sorted(set(seen_ids)), device=logits.device)
        prev = logits[idx]
        logits[idx] = torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty)
        logits = logits.nan_to_num(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)  # extreme penalties
    if temperature <= 0:
        return int(logits.argmax())
    # Shifted so the largest logit is 0 and divided in float64: a tiny temperature then drives the others
    # to -inf (greedy in the limit) instead of overflowing them all to inf, whose softmax is NaN.
    logits = ((logits - logits.max()).double() / temperature).float()
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, sorted_idx = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, sorted_idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def stream_text(tokenizer, token_ids):
    """Turn a stream of token ids into text pieces, holding back bytes of an unfinished UTF-8 character
    (byte-level BPE can split one Chinese character or emoji across tokens)."""
    ids, emitted = [], ""
    for tid in token_ids:
        ids.append(tid)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > len(emitted):
        yield text[len(emitted):]


def count_parameters(model) -> int:
    """Unique parameters (the tied embedding counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# Let AutoConfig / AutoModelForCausalLM find "minimind" checkpoints saved by this code.
try:
    from transformers import AutoConfig, AutoModelForCausalLM
    AutoConfig.register("minimind", MiniMindConfig)
    AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM)
except ValueError:  # already registered (module imported twice under different names)
    pass
