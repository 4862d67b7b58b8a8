"""LoRA: low-rank adapters on chosen nn.Linear layers of any model.

y = W x + (alpha / rank) * B (A x), A [rank, in] random, B [out, rank] zero, so a new adapter changes
nothing until trained. The base weights keep their names and are never touched by training; `merge_lora`
folds the adapter into W (exactly undone by `unmerge_lora`).
"""
import math

import torch
from torch import nn

from trainer.cli import UserError
from trainer.file_io import atomic_torch_save, read_torch_file

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRAError(UserError, ValueError):
    """An adapter that does not fit the model, or a file that is not an adapter (one line, exit 1)."""


def _lora_forward_hook(module, inputs, output):
    if module.lora_merged:
        return output
    x = inputs[0]
    return output + (x.to(module.lora_A.dtype) @ module.lora_A.t() @ module.lora_B.t()).to(output.dtype) * module.lora_scale


def lora_layers(model):
    """(name, module) of every Linear carrying an adapter."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A")]


def apply_lora(model, rank=16, alpha=None, targets=DEFAULT_TARGETS):
    """Add an adapter to every nn.Linear whose name ends with one of `targets`. alpha defaults to rank
    (scale 1, as in MiniMind). Returns the number of adapted layers."""
    if lora_layers(model):
        raise LoRAError("this model already has LoRA adapters")
    alpha = rank if alpha is None else alpha
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            w = module.weight
            module.lora_A = nn.Parameter(torch.empty(rank, module.in_features, device=w.device, dtype=w.dtype))
            module.lora_B = nn.Parameter(torch.zeros(module.out_features, rank, device=w.device, dtype=w.dtype))
            nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
            module.lora_scale = alpha / rank
            module.lora_merged = False
            module._lora_hook = module.register_forward_hook(_lora_forward_hook)
            n += 1
    if n == 0:
        raise LoRAError(f"no nn.Linear layer is named like any of the targets {list(targets)}")
    model._lora_meta = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    return n


def mark_only_lora_trainable(model):
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name.rsplit(".", 1)[-1]
    return [p for p in model.parameters() if p.requires_grad]


def lora_state_dict(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


def save_lora(model, path):
    """Adapter weights only, plus rank/alpha/targets, written atomically."""
    payload = {"lora": {k: v.cpu() for k, v in lora_state_dict(model).items()}, "meta": dict(model._lora_meta)}
    atomic_torch_save(payload, path)


def _check_lora_payload(payload, path):
    """The parts of an adapter file, checked before any of them touches the model."""
    fix = "train it again with train_lora.py, or check --lora_name / --out_dir"
    if not isinstance(payload, dict) or not isinstance(payload.get("lora"), dict) or not isinstance(payload.get("meta"), dict):
        raise LoRAError(f"{path}: not a LoRA file written by save_lora (no 'lora'/'meta' entries); {fix}")
    meta, weights = payload["meta"], payload["lora"]
    rank, alpha, targets = meta.get("rank"), meta.get("alpha"), meta.get("targets")
    if (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or not isinstance(alpha, (int, float))
            or isinstance(alpha, bool) or not math.isfinite(alpha) or not isinstance(targets, list)
            or not targets or not all(isinstance(t, str) for t in targets)):
        raise LoRAError(f"{path}: its rank/alpha/targets ({rank!r}/{alpha!r}/{targets!r}) are not a LoRA setting; {fix}")
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in weights.items()):
        raise LoRAError(f"{path}: its 'lora' entry is not a dict of tensors; {fix}")
    return meta, weights


def load_lora(model, path):
    """Apply (if needed) and load an adapter saved by save_lora. Strict: targets, rank and every shape
    must match this model. A missing, empty, truncated or foreign file is one clear LoRAError/UserError."""
    payload = read_torch_file(path, "LoRA adapter", "train it again with train_lora.py, or check --lora_name / --out_dir")
    meta, weights = _check_lora_payload(payload, path)
    if lora_layers(model):
        have = model._lora_meta
        if have["rank"] != meta["rank"] or sorted(have["targets"]) != sorted(meta["targets"]):
            raise LoRAError(f"{path}: adapter rank/targets {meta['rank']}/{meta['targets']} differ from the "
                            f"model's {have['rank']}/{have['targets']}")
    else:
        apply_lora(model, rank=meta["rank"], alpha=meta["alpha"], targets=meta["targets"])
    own = dict(model.named_parameters())
    expected = set(lora_state_dict(model))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise LoRAError(f"{path}: adapter does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
                        f"was it trained for another --dim/--n_layers?")
    for k, v in weights.items():
        if own[k].shape != v.shape:
            raise LoRAError(f"{path}: {k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}; "
                            f"was it trained for another --dim?")
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v)
    return meta


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight. Idempotent: an already merged layer is left alone."""
    for _, m in lora_layers(model):
        if m.lora_merged:
            continue
        m._lora_base = m.weight.detach().clone()  # kept so unmerge restores the exact bits
        m.weight += (m.lora_B.float() @ m.lora_A.float() * m.lora_scale).to(m.weight.dtype)
        m.lora_merged = True


@torch.no_grad()
def unmerge_lora(model):
    for _, m in lora_layers(model):
        if not m.lora_merged:
            continue
        m.weight.copy_(m._lora_base)
        del m._lora_base
        m.lora_merged = False


def remove_lora(model):
    """Drop the adapters (merged ones stay folded in the weights)."""
    for _, m in lora_layers(model):
        m._lora_hook.remove()
        del m.lora_A, m.lora_B, m._lora_hook
        for attr in ("lora_scale", "lora_merged", "_lora_base"):
            if hasattr(m, attr):
                delattr(m, attr)
    if hasattr(model, "_lora_meta"):
        del model._lora_meta
