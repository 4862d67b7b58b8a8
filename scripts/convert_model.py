"""
Convert between MiniMind's native stage checkpoints and transformers model folders.

    # native -> transformers (safetensors + config + tokenizer + chat template + generation_config)
    python scripts/convert_model.py --model_mode 1 --dim 512 --save_dir out/MiniMind2-Small
    python scripts/convert_model.py --weight out/full_sft_512.pth --lora_name lora_medical --save_dir out/minimind-medical
    python scripts/convert_model.py --weight grpo --save_dir out/minimind-grpo     # a stage by its prefix: out/grpo_512.pth
    # transformers -> native X.pth + X.json (loadable by every train_*.py / eval_model.py)
    python scripts/convert_model.py --to_native --model_path out/MiniMind2-Small --weight out/full_sft_512.pth

A dense model becomes a plain `LlamaForCausalLM` (MiniMind2 architecture) or `Qwen3ForCausalLM` (with
QK-norm: MiniMind-3 architecture), same keys, same numerics, so `AutoModelForCausalLM.from_pretrained(dir)`
loads it without `trust_remote_code` and vLLM, llama.cpp's converter and other tools take it as is; its
config.json also carries the fields transformers 4.x reads (rope_theta, ...) and its tokenizer config loads
in transformers 4.4x through 5.x. A MoE model (or a dense one with YaRN RoPE) is saved as MiniMind code
(model_minimind.py copied into the folder, `auto_map` in the config) and needs `trust_remote_code=True`.
`--to_native` reads any of these back (and MiniMind-3's own transformers folders).

    # native -> one GGUF file for llama.cpp / ollama (dense models; f32, f16 or q8_0)
    python scripts/convert_model.py --model_mode 1 --dim 512 --gguf out/minimind2-small.gguf
"""
import argparse
import copy
import json
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from model.model_minimind import (MiniMindConfig, MiniMindForCausalLM, config_from_minimind3,  # noqa: E402
                                  is_minimind3_config)
from trainer_utils import (MODEL_MODES, ArgumentParser, UserError, add_bool, atomic_write_text, brief,  # noqa: E402
                           check_weight_tokenizer, is_weight_path, load_weights, lora_weight_path, plain_name, positive_int,
                           read_json_file, resolve_weight, run_main, save_weights, weight_path)
from trainer.file_io import describe_os_error  # noqa: E402

MODEL_FILE = os.path.join(ROOT, "model", "model_minimind.py")
GENERATION_DEFAULTS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True, temperature=0.85, top_p=0.85)


# ----------------------------------------------------------------------------------------------------
# Choosing and loading a native checkpoint (shared with serve_openai_api.py)
# ----------------------------------------------------------------------------------------------------
def add_model_args(p, weight_help):
    """The eval_model.py way of naming a checkpoint: --model_mode/--out_dir/--dim/..., or --weight."""
    g = p.add_argument_group("native checkpoint")
    g.add_argument("--weight", default=None, help=weight_help)
    g.add_argument("--out_dir", default="out", help="folder with the stage weight files")
    g.add_argument("--model_mode", type=int, default=1, choices=sorted(MODEL_MODES),
                   help="0 pretrain, 1 full_sft, 2 rlhf, 3 reason: picks {out_dir}/{stage}_{dim}[_moe].pth")
    g.add_argument("--dim", "--hidden_size", dest="dim", type=positive_int, default=512, help="hidden size")
    g.add_argument("--n_layers", "--num_hidden_layers", dest="n_layers", type=positive_int, default=8,
                   help="Transformer blocks (only used for a .pth without its .json)")
    g.add_argument("--n_heads", "--num_attention_heads", dest="n_heads", type=positive_int, default=8)
    g.add_argument("--n_kv_heads", "--num_key_value_heads", dest="n_kv_heads", type=positive_int, default=2)
    add_bool(g, "--use_moe", help="mixture-of-experts model (picks the *_moe.pth file)")
    g.add_argument("--lora_name", type=plain_name, default=None, help="merge the adapter {out_dir}/lora/{lora_name}_{dim}.pth into the weights")
    g.add_argument("--lora_path", default=None, help="merge this adapter file (instead of --lora_name)")
    g.add_argument("--tokenizer_path", default=os.path.join(ROOT, "model"), help="folder with tokenizer.json / tokenizer_config.json")
    return g


def native_weight_path(args):
    """(path, the script that makes it) for --weight or --model_mode/--out_dir/--dim/--use_moe."""
    return resolve_weight(args, args.weight or MODEL_MODES[args.model_mode])


def lora_file(args, dim):
    if args.lora_path:
        return args.lora_path
    if args.lora_name and args.lora_name != "None":  # MiniMind passes the string "None" for no adapter
        return lora_weight_path(args.out_dir, args.lora_name, dim)
    return None


def load_native(args):
    """The native model the flags name, with its LoRA adapter (if any) merged in. Returns (model, name)."""
    from model.model_lora import load_lora, merge_lora, remove_lora
    path, maker = native_weight_path(args)
    if not os.path.exists(path):
        hint = f"run {maker} first, or " if maker else ""
        raise UserError(f"{path} not found: {hint}check --weight / --model_mode / --out_dir / --dim / --use_moe")
    args.dropout = 0.0
    # Flags describe the model only for a bare MiniMind2 .pth; with its .json beside it, that wins quietly.
    has_json = os.path.exists(path[:-len(".pth")] + ".json")
    model = load_weights(path, None if has_json else args, what_makes_it=maker)
    check_weight_tokenizer(path, model, args.tokenizer_path)
    name = os.path.basename(path)[:-len(".pth")]
    lpath = lora_file(args, model.config.hidden_size)
    if lpath:
        if not os.path.exists(lpath):
            raise UserError(f"LoRA adapter {lpath} not found: run train_lora.py --lora_name {args.lora_name or '...'} first "
                            f"(or check --lora_name/--lora_path and --out_dir)")
        load_lora(model, lpath)
        merge_lora(model)
        remove_lora(model)  # the adapter now lives in the base weights
        name += "_" + os.path.basename(lpath)[:-len(".pth")]
    return model.eval(), name


# ----------------------------------------------------------------------------------------------------
# native -> transformers
# ----------------------------------------------------------------------------------------------------
def hf_kind(config: MiniMindConfig) -> str:
    """The transformers class a model maps onto: "llama" (MiniMind2 dense), "qwen3" (dense with QK-norm,
    MiniMind-3), or "minimind" (MoE, YaRN or smeared keys: our own code, trust_remote_code)."""
    if config.use_moe or config.yarn_scaling or config.smeared_keys:
        return "minimind"
    return "qwen3" if config.qk_norm else "llama"


# Fields transformers 4.x (and tools that read config.json themselves: llama.cpp's converter, vLLM) look
# for, which transformers 5 folds into rope_parameters / renames.
def add_legacy_config_fields(config_path, rope_theta, dtype):
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.setdefault("rope_theta", rope_theta)
    cfg.setdefault("rope_scaling", None)
    cfg.setdefault("torch_dtype", dtype)
    atomic_write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", config_path)


def write_portable_tokenizer(tokenizer, folder):
    """tokenizer.json + tokenizer_config.json that transformers 4.4x through 5.x load alike: the class name
    every version knows (5.x writes "TokenizersBackend"), the chat template inline (4.4x reads no
    chat_template.jinja), and merges as "a b" strings (tokenizers < 0.20 reads no [a, b] pairs)."""
    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = tokenizer_json["model"].get("merges") or []
    if merges and isinstance(merges[0], list) and not any(" " in a or " " in b for a, b in merges):
        tokenizer_json["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    atomic_write_text(json.dumps(tokenizer_json, ensure_ascii=False, indent=1), os.path.join(folder, "tokenizer.json"))
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                      "single_word": t.single_word, "special": t.special}
             for i, t in sorted(tokenizer.added_tokens_decoder.items())}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
              "add_prefix_space": False, "added_tokens_decoder": added,
              "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
              "unk_token": tokenizer.unk_token, "clean_up_tokenization_spaces": False,
              "model_max_length": tokenizer.model_max_length, "chat_template": tokenizer.chat_template}
    atomic_write_text(json.dumps(config, ensure_ascii=False, indent=2), os.path.join(folder, "tokenizer_config.json"))


def export_transformers(model: MiniMindForCausalLM, save_dir, tokenizer_path, dtype="float32", overwrite=False):
    """Write a transformers folder for `model`. Returns the kind written (see hf_kind).

    Written into a temporary folder beside save_dir and renamed at the end, so a failed export never
    leaves half a model behind."""
    from transformers import GenerationConfig, LlamaForCausalLM, Qwen3ForCausalLM

    from dataset.lm_dataset import load_tokenizer
    if os.path.isdir(save_dir) and os.listdir(save_dir) and not overwrite:
        raise UserError(f"--save_dir {save_dir} exists and is not empty; choose another folder or pass --overwrite 1")
    if not os.path.exists(os.path.join(tokenizer_path, "tokenizer.json")):
        raise UserError(f"{tokenizer_path}/tokenizer.json not found: run train_tokenizer.py or point --tokenizer_path at the tokenizer folder")
    tokenizer = load_tokenizer(tokenizer_path)
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"tokenizer {tokenizer_path} has {len(tokenizer)} tokens but the model only {model.config.vocab_size}")
    parent = os.path.dirname(os.path.abspath(save_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert_", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        config = model.config
        kind = hf_kind(config)
        if kind in ("llama", "qwen3"):
            hf_config = config.to_llama_config() if kind == "llama" else config.to_qwen3_config()
            hf_config.tie_word_embeddings = bool(config.tie_word_embeddings)
            hf_class = LlamaForCausalLM if kind == "llama" else Qwen3ForCausalLM
            hf_config.architectures = [hf_class.__name__]
            out = hf_class(hf_config).to(getattr(torch, dtype))
            out.load_state_dict(model.state_dict(), strict=True)  # same keys: the whole point of Llama/Qwen3 naming
        else:
            out = copy.deepcopy(model).to(getattr(torch, dtype))
            out.config.architectures = ["MiniMindForCausalLM"]
            out.config.auto_map = {"AutoConfig": "model_minimind.MiniMindConfig",
                                   "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM"}
            shutil.copy(MODEL_FILE, os.path.join(tmp, "model_minimind.py"))
        out.save_pretrained(tmp, safe_serialization=True)
        add_legacy_config_fields(os.path.join(tmp, "config.json"), config.rope_theta, dtype)
        GenerationConfig(**GENERATION_DEFAULTS).save_pretrained(tmp)
        write_portable_tokenizer(tokenizer, tmp)
        # The old folder steps aside (a rename) and is deleted only once the new one is in its place.
        old = f"{tmp}.old"
        if os.path.exists(save_dir):
            os.rename(save_dir, old)
        os.replace(tmp, save_dir)
        if os.path.exists(old):
            shutil.rmtree(old)
    except OSError as e:  # a full disk or no permission while writing: the previous export is untouched
        raise UserError(describe_os_error(e, e.filename or save_dir, writing=True)) from None
    except Exception as e:  # noqa: BLE001 - safetensors reports a full disk as its own error type
        if isinstance(e, UserError):
            raise
        raise UserError(f"--save_dir {save_dir}: writing the export failed ({brief(e)}); check the free space there "
                        f"(the previous export, if any, is untouched)") from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return kind


# ----------------------------------------------------------------------------------------------------
# transformers -> native
# ----------------------------------------------------------------------------------------------------
_NOT_CONFIG = ("architectures", "auto_map", "transformers_version", "dtype", "torch_dtype", "model_type",
               "_name_or_path", "use_cache", "output_attentions", "output_hidden_states", "return_dict")


def _config_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in _NOT_CONFIG}


def minimind_config_from_hf(cfg: dict, where: str) -> MiniMindConfig:
    """MiniMindConfig for a transformers config.json (model_type llama, qwen3 or minimind; MiniMind-3's own
    minimind config too)."""
    mtype = cfg.get("model_type")
    try:
        if mtype == "minimind":
            if is_minimind3_config(cfg):
                return config_from_minimind3(_config_kwargs(cfg))
            return MiniMindConfig(**_config_kwargs(cfg))
        if mtype not in ("llama", "qwen3"):
            raise UserError(f"{where}: model_type {mtype!r} is not 'llama', 'qwen3' or 'minimind'; cannot convert it")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        problems = []
        if rope_type != "default":
            problems.append(f"rope_type {rope_type!r} (only default RoPE)")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            problems.append("attention/MLP biases")
        if cfg.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {cfg['hidden_act']!r} (only silu)")
        if cfg.get("use_sliding_window"):
            problems.append("sliding-window attention")
        if problems:
            raise UserError(f"{where}: this {mtype} model does not map onto MiniMind: {', '.join(problems)}")
        return MiniMindConfig(
            hidden_size=hidden, num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads, intermediate_size=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or hidden // heads, qk_norm=mtype == "qwen3",
            vocab_size=cfg["vocab_size"], max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{where}: cannot build a MiniMind config ({type(e).__name__}: {e})") from None


def read_hf_state_dict(model_dir):
    """All tensors of a transformers folder: model.safetensors, sharded safetensors, or pytorch_model.bin."""
    from safetensors.torch import load_file
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    binary = os.path.join(model_dir, "pytorch_model.bin")
    try:
        if os.path.exists(single):
            return load_file(single)
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            sd = {}
            for shard in shards:
                sd.update(load_file(os.path.join(model_dir, shard)))
            return sd
        if os.path.exists(binary):
            return torch.load(binary, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable weight file is the same user problem
        raise UserError(f"{model_dir}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    raise UserError(f"{model_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_transformers_dir(model_dir) -> MiniMindForCausalLM:
    """A transformers folder (Llama or MiniMind) as a native MiniMindForCausalLM, loaded strictly."""
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise UserError(f"--model_path {model_dir} not found (a transformers folder with config.json and weights)")
    if not os.path.exists(cfg_path):
        raise UserError(f"{cfg_path} not found: --model_path must be a transformers model folder")
    cfg = read_json_file(cfg_path, "transformers config", "restore the folder's config.json, or export it again")
    config = minimind_config_from_hf(cfg, cfg_path)
    sd = {k.removeprefix("module."): v for k, v in read_hf_state_dict(model_dir).items()}
    model = MiniMindForCausalLM(config)
    own = model.state_dict()
    if config.tie_word_embeddings and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # old Llama files carry this buffer
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise UserError(f"{model_dir}: weights do not fit its config.json: missing {missing[:2]}, unexpected {unexpected[:2]}")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise UserError(f"{model_dir}: {k} has shape {tuple(v.shape)}, config.json implies {tuple(own[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, weight_help="the native .pth (its .json beside it), or a stage prefix in --out_dir (grpo, ppo, ...): "
                                  "read when exporting, written with --to_native (default: picked by --model_mode/--out_dir/--dim/--use_moe)")
    g = p.add_argument_group("transformers side")
    g.add_argument("--save_dir", default=None, help="transformers folder to write (default: {out_dir}/transformers/{name})")
    add_bool(g, "--to_native", help="convert the other way: --model_path (a transformers folder) -> native --weight")
    g.add_argument("--model_path", default=None, help="with --to_native: the transformers folder to read")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the written weights (float32 keeps them bit-exact)")
    add_bool(g, "--overwrite", help="replace an existing --save_dir / native weight file / --gguf file")
    g = p.add_argument_group("llama.cpp / ollama")
    g.add_argument("--gguf", default=None, metavar="FILE",
                   help="write one GGUF file (weights, tokenizer, chat template) instead of a transformers folder; dense models")
    g.add_argument("--gguf_type", default="f16", choices=["f32", "f16", "q8_0"], help="GGUF weight type (norms stay f32)")
    return p


def export_gguf(model, tokenizer_path, path, qtype, overwrite):
    try:
        from scripts.gguf_export import GGUFExportError, write_gguf
        import gguf  # noqa: F401 - optional: only this export needs it
    except ImportError:
        raise UserError("--gguf needs the gguf package: pip install 'gguf>=0.17,<1'") from None
    from dataset.lm_dataset import load_tokenizer
    if not path.endswith(".gguf"):
        raise UserError(f"--gguf {path}: the file name must end in .gguf")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite 1 to replace it (or choose another --gguf)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        return write_gguf(model, load_tokenizer(tokenizer_path), path, qtype)
    except GGUFExportError as e:
        raise UserError(str(e)) from None


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.to_native:
        if not args.model_path:
            raise UserError("--to_native needs --model_path (the transformers folder to read)")
        model = load_transformers_dir(args.model_path)
        out = args.weight or MODEL_MODES[args.model_mode]
        if not is_weight_path(out):  # a stage prefix: the file name carries the model's own size
            out = weight_path(args.out_dir, out, model.config.hidden_size, model.config.use_moe)
        if not out.endswith(".pth"):
            raise UserError(f"--weight {out}: a native weight file name must end in .pth")
        if os.path.exists(out) and not args.overwrite:
            raise UserError(f"{out} exists; pass --overwrite 1 to replace it (or choose another --weight)")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        # the folder's own tokenizer is the one these weights belong to
        has_tokenizer = os.path.exists(os.path.join(args.model_path, "tokenizer.json"))
        save_weights(model, out, args.dtype, tokenizer_path=args.model_path if has_tokenizer else None)
        print(f"wrote {out} and {out[:-len('.pth')]}.json (dim={model.config.hidden_size} n_layers="
              f"{model.config.num_hidden_layers} use_moe={int(model.config.use_moe)}) from {args.model_path}")
        return out
    if args.model_path:
        raise UserError("--model_path is read only with --to_native; to export, name the native model with --weight or --model_mode")
    model, name = load_native(args)
    if args.gguf:
        arch = export_gguf(model, args.tokenizer_path, args.gguf, args.gguf_type, args.overwrite)
        print(f"wrote {args.gguf} ({arch}, {args.gguf_type}): llama.cpp and ollama load it (see README, 'Coming from MiniMind')")
        return args.gguf
    save_dir = args.save_dir or os.path.join(args.out_dir, "transformers", name)
    kind = export_transformers(model, save_dir, args.tokenizer_path, args.dtype, args.overwrite)
    if kind in ("llama", "qwen3"):
        how = f"AutoModelForCausalLM.from_pretrained(dir) loads it as {'LlamaForCausalLM' if kind == 'llama' else 'Qwen3ForCausalLM'}"
    else:
        how = "AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) loads it (MiniMind code copied in)"
    print(f"wrote {save_dir}: {how}")
    return save_dir


if __name__ == "__main__":
    run_main(main)
