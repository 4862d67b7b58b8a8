"""One GGUF file (weights + tokenizer + chat template) for llama.cpp and ollama, written with the `gguf` package.

Used by `scripts/convert_model.py --gguf FILE`. Dense models only: MiniMind2's architecture is written as
llama.cpp's "llama", MiniMind-3's (QK-norm) as "qwen3".

The tokenizer is declared as GPT-2's byte-level BPE with the "gpt-2" pre-tokenizer: our tokenizers split
text with GPT-2's regex before BPE, exactly what llama.cpp's "gpt-2" pre-tokenizer does. (llama.cpp's own
converter recognises vocabularies by a hash of their ids and refuses unknown ones; patching it to reuse
qwen2's pre-tokenizer, as MiniMind's README suggests, splits digits and some punctuation differently.)
"""
import os

import numpy as np
import torch

QUANT_TYPES = ("f32", "f16", "q8_0")

# transformers/Llama parameter names -> llama.cpp tensor names, per block and for the whole model
BLOCK_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
MODEL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


class GGUFExportError(ValueError):
    """A model or tokenizer this exporter cannot write (one line)."""


def gguf_tensor_name(key):
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'."""
    base, suffix = key.rsplit(".", 1)
    if base in MODEL_TENSORS:
        return f"{MODEL_TENSORS[base]}.{suffix}"
    parts = base.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in BLOCK_TENSORS:
        return f"blk.{parts[2]}.{BLOCK_TENSORS['.'.join(parts[3:])]}.{suffix}"
    raise GGUFExportError(f"no GGUF name for parameter {key}")


def rotate_half_to_interleaved(weight, n_heads):
    """Reorder a q/k projection's output rows from rotate-half RoPE pairs (i, i + d/2), which transformers'
    Llama uses, to the adjacent pairs (2i, 2i + 1) that llama.cpp's "llama" architecture rotates."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def tokenizer_vocab(tokenizer, vocab_size):
    """(tokens, token types, merges) as llama.cpp's BPE tokenizer wants them, padded to the model's vocab."""
    import json

    import gguf
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer model {model.get('type')!r}: only byte-level BPE tokenizers can be written")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def tensor_data(tensor, qtype):
    """(numpy data, raw GGML type or None) for one tensor: norms stay f32, matrices take `qtype` (q8_0 needs
    rows that are a multiple of 32 long; others fall back to f16)."""
    import gguf
    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1 or qtype == "f32":
        return data, None
    if qtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def write_gguf(model, tokenizer, path, qtype="f16", name=None):
    """Write `model` (a dense MiniMindForCausalLM) and `tokenizer` (a transformers fast tokenizer) to `path`."""
    import gguf
    config = model.config
    if config.use_moe or config.yarn_scaling or config.smeared_keys:
        raise GGUFExportError("GGUF export writes dense models without YaRN or smeared keys only (this one is MoE, "
                              "uses YaRN or smears its keys: llama.cpp has no such layer); "
                              "export it as a transformers folder (--save_dir) instead")
    if qtype not in QUANT_TYPES:
        raise GGUFExportError(f"--gguf_type {qtype!r}: choose one of {', '.join(QUANT_TYPES)}")
    arch = "qwen3" if config.qk_norm else "llama"
    tokens, types, merges = tokenizer_vocab(tokenizer, config.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]

    tmp = f"{path}.tmp{os.getpid()}"  # written whole, then renamed: a failed export leaves no half file
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(name or os.path.splitext(os.path.basename(path))[0])
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(False)  # the chat template writes every special token itself
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        if key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")) and arch == "llama":
            heads = config.num_attention_heads if ".q_proj." in key else config.num_key_value_heads
            tensor = rotate_half_to_interleaved(tensor, heads)
        data, raw_type = tensor_data(tensor, qtype)
        writer.add_tensor(gguf_tensor_name(key), data, raw_dtype=raw_type)

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return arch
