"""Plumbing every training stage shares: arguments, DDP, precision, LR schedule, logging, checkpoints and
the training loop. Each train_*.py keeps its own idea (data and loss) and imports the rest from here."""
import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import random
import sys
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

from model import model_minimind
from model.model_minimind import (MiniMindConfig, MiniMindForCausalLM, config_from_minimind3_state_dict, count_parameters,
                                  is_minimind3_state_dict, minimind3_options)
from trainer.cli import (ArgumentParser, UserError, add_bool, brief, device_name, float_in, int_in, is_first_rank,  # noqa: F401
                         nonneg_float, nonneg_int, plain_name, port_int, positive_float, positive_int, run_main, seed_int,
                         str2bool)
from trainer.file_io import (atomic_torch_save, atomic_write_files, atomic_write_text, describe_os_error,  # noqa: F401
                             read_json_file, read_torch_file)
from trainer.tokenizer_fingerprint import tokenizer_mismatch, tokenizer_record

STAGE_SCRIPTS = {"pretrain": "train_pretrain.py", "full_sft": "train_full_sft.py", "rlhf": "train_dpo.py",
                 "reason": "train_distill_reason.py", "full_dist": "train_distillation.py", "grpo": "train_grpo.py",
                 "ppo": "train_ppo.py", "agent": "train_agent.py"}
MODEL_MODES = {0: "pretrain", 1: "full_sft", 2: "rlhf", 3: "reason"}  # --model_mode of eval_model.py and the tools


def build_parser(description, *, out_weight, epochs, batch_size, learning_rate, max_seq_len, data_path,
                 accumulation_steps=1, log_interval=100, save_interval=100, from_weight=None, packing=False,
                 data_column=None, num_workers=None):
    """The flags every stage shares, with MiniMind2's names and this stage's defaults. Stages add their own.
    data_column="text" adds --text_column, for a corpus that names the column the stage reads differently.
    num_workers=0: the stage reads data too cheap to need DataLoader workers (RL prompts)."""
    p = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--dim", "--hidden_size", dest="dim", type=positive_int, default=512, help="hidden size (512: 26M, 768: 104M, 640 + --use_moe: 145M)")
    g.add_argument("--n_layers", "--num_hidden_layers", dest="n_layers", type=positive_int, default=8, help="number of Transformer blocks")
    g.add_argument("--n_heads", "--num_attention_heads", dest="n_heads", type=positive_int, default=8, help="query heads")
    g.add_argument("--n_kv_heads", "--num_key_value_heads", dest="n_kv_heads", type=positive_int, default=None,
                   help="key/value heads (GQA); default 2, or 4 with --arch minimind3")
    add_bool(g, "--use_moe", help="mixture-of-experts feed-forward (4 routed experts, top-2, 1 shared; minimind3: top-1, none shared)")
    g.add_argument("--arch", default="minimind2", choices=["minimind2", "minimind3"],
                   help="architecture of a new model: MiniMind2's, or MiniMind-3's (QK-norm, FFN 64*ceil(pi*dim/64), "
                        "4 KV heads, eps 1e-6, top-1 MoE); a loaded weight file keeps its own")
    add_bool(g, "--smeared_keys", help="a new model whose keys mix in the previous token's key, so that in-context "
                                       "copying forms in hundreds of steps, not thousands (not Llama: exports need "
                                       "trust_remote_code; see the README, 'Smeared keys'); a loaded weight file keeps its own")
    g.add_argument("--max_seq_len", type=int_in(2), default=max_seq_len,
                   help="tokens per sample (at least 2: one to read, one to predict); longer samples are truncated")
    g.add_argument("--tokenizer_path", default="model", help="folder with tokenizer.json / tokenizer_config.json")
    if from_weight is not None:
        g.add_argument("--from_weight", default=from_weight,
                       help="weights to start from: a stage prefix in --out_dir (pretrain, full_sft, rlhf, reason, grpo, ...), "
                            "a .pth path, or none (a new model from the flags above)")
    g.add_argument("--save_weight", type=plain_name, default=out_weight, help="prefix of the weight file this stage writes")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=data_path,
                   help="training data: a jsonl file, a .parquet file, a folder or quoted glob of parquet files, or a "
                        "folder written by datasets' save_to_disk" + (" (or token shards from scripts/prepare_data.py)"
                                                                      if data_column == "text" else ""))
    if data_column:
        g.add_argument(f"--{data_column}_column", default=data_column,
                       help=f'the key / column that holds "{data_column}", if the data names it differently')
    g.add_argument("--num_workers", type=nonneg_int, default=num_workers,
                   help="DataLoader worker processes " + (
                       "(the prompts are cheap to read: no worker process needed)" if num_workers is not None else
                       "(unset: 1 on the CPU; on CUDA 8, or the CPU cores per process if fewer: samples are tokenized "
                       "as they are read, and 4 workers left a compiled 26M run on an H200 waiting for data a quarter "
                       "of the time)"))
    add_bool(g, "--skip_bad_lines", help="skip malformed data lines (and report how many) instead of stopping")
    if packing:
        add_bool(g, "--packing", help="pack several samples per row (attention and positions restart per sample): "
                                      "far less padding when most samples are shorter than --max_seq_len")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=epochs, help="passes over the data")
    g.add_argument("--batch_size", type=positive_int, default=batch_size, help="samples per micro-batch per process")
    g.add_argument("--learning_rate", "--lr", dest="learning_rate", type=positive_float, default=learning_rate, help="peak LR; cosine decays to lr/10")
    g.add_argument("--accumulation_steps", type=positive_int, default=accumulation_steps, help="micro-batches per optimizer step")
    g.add_argument("--grad_clip", type=nonneg_float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--warmup_iters", type=nonneg_int, default=0, help="linear LR warmup, in optimizer steps")
    g.add_argument("--weight_decay", type=nonneg_float, default=0.0, help="AdamW weight decay")
    g.add_argument("--seed", type=seed_int, default=42, help="seed for initialisation and data order (rank r uses seed + r)")
    g.add_argument("--dropout", type=float_in(0, 1, hi_open=True), default=0.0, help="dropout in attention, feed-forward and embeddings")
    g.add_argument("--max_nonfinite", type=positive_int, default=10, help="stop after this many non-finite losses in a row")
    g.add_argument("--max_steps", type=nonneg_int, default=0,
                   help="cap on optimizer steps; the LR schedule spans the capped run (0: --epochs decides)")
    g.add_argument("--stop_at_step", type=nonneg_int, default=0,
                   help="stop (after saving) at this optimizer step as if interrupted; resume later with --resume 1 (0: run to the end)")

    g = p.add_argument_group("system")
    g.add_argument("--device", type=device_name, default="cuda:0" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]; torchrun sets the GPU per process")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="autocast dtype on CUDA (CPU runs float32)")
    g.add_argument("--compile", "--use_compile", dest="compile", type=str2bool, nargs="?", const=True, default=None, metavar="0|1",
                   help="torch.compile the model; the first steps are slower while it compiles (unset: on for CUDA where "
                        "Triton is installed, falling back to eager if compiling fails; it trained 26M 1.5-2x faster on an "
                        "H200, benchmarks/gpu.md. Off on the CPU)")
    add_bool(g, "--ddp", help="accepted for MiniMind compatibility; DDP is used whenever torchrun starts the script")
    g.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                   help="accepted for torch.distributed.launch, which passes it; the rank is read from the environment")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--out_dir", "--save_dir", dest="out_dir", default="out", help="where weight, resume and log files go")
    g.add_argument("--log_interval", type=positive_int, default=log_interval, help="optimizer steps between log lines")
    g.add_argument("--save_interval", type=positive_int, default=save_interval, help="optimizer steps between checkpoints (the end always saves)")
    add_bool(g, "--resume", "--from_resume", help="continue from the resume file in --out_dir if there is one")
    g.add_argument("--save_dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="dtype of the weight file")
    add_bool(g, "--use_wandb", help="log to Weights & Biases (offline mode without an API key)")
    g.add_argument("--wandb_project", default="MiniMind", help="wandb project name")
    return p


def model_config_from_args(args) -> MiniMindConfig:
    options = minimind3_options(args.dim) if getattr(args, "arch", "minimind2") == "minimind3" else {}
    options.update(hidden_size=args.dim, num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                   use_moe=args.use_moe, dropout=args.dropout, smeared_keys=bool(getattr(args, "smeared_keys", False)))
    if args.n_kv_heads is not None:  # None: the architecture's own (MiniMind2 2, MiniMind-3 4)
        options["num_key_value_heads"] = args.n_kv_heads
    try:
        return MiniMindConfig(**options)
    except ValueError as e:
        raise UserError(f"bad model flags: {e}") from None


# ----------------------------------------------------------------------------------------------------
# Processes and precision
# ----------------------------------------------------------------------------------------------------
class Context:
    """Where this process runs: rank, world size, device, autocast."""
    def __init__(self, args):
        packed_attention = model_minimind.packed_attention_kind()
        if packed_attention not in ("flex", "sdpa"):
            raise UserError(f"MINIMIND_PACKED_ATTENTION={packed_attention}: use flex (the default) "
                            f"or sdpa (the attention of packed batches on CUDA)")
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        if self.ddp:
            self.rank, self.local_rank, self.world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
            if args.device.startswith("cuda"):
                self.device = torch.device(f"cuda:{self.local_rank}")
                torch.cuda.set_device(self.device)
                dist.init_process_group(backend="nccl")
            else:
                self.device = torch.device("cpu")
                dist.init_process_group(backend="gloo")
        else:
            self.rank, self.local_rank, self.world = 0, 0, 1
            if args.device.startswith("cuda") and not torch.cuda.is_available():
                raise UserError(f"--device {args.device} but CUDA is not available; use --device cpu")
            self.device = torch.device(args.device)
        self.is_master = self.rank == 0
        self.cuda = self.device.type == "cuda"
        self.dtype = getattr(torch, args.dtype) if self.cuda else torch.float32
        self.autocast = (torch.autocast("cuda", dtype=self.dtype) if self.cuda and self.dtype != torch.float32
                         else contextlib.nullcontext())
        # GradScaler only for float16: bf16 has float32's exponent range.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda and self.dtype == torch.float16)
        seed_everything(args.seed + self.rank)

    def print(self, *a, **kw):
        if self.is_master:
            print(*a, **kw, flush=True)

    def all_reduce_mean(self, t):
        if self.ddp:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world
        return t

    def all_reduce_max(self, t):
        if self.ddp:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def on_master(self, fn):
        """Run fn() on rank 0 only (writing files, say) and tell every rank how it went: a UserError there is
        raised on every rank, so all stop together and rank 0 prints it once; any other failure there stops
        the other ranks quietly (exit 1) while rank 0 shows its traceback. Returns fn()'s result on rank 0."""
        result, failure = None, None
        if self.is_master:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - shared with the other ranks, then raised again below
                failure = e
        shared = None if failure is None else (isinstance(failure, UserError), str(failure))
        if self.ddp:
            box = [shared]
            dist.broadcast_object_list(box, src=0)
            shared = box[0]
        if failure is not None:
            raise failure
        if shared is not None:
            raise UserError(shared[1] if shared[0] else "rank 0 failed (its traceback is above)")
        return result


def seed_everything(seed):
    seed %= 2**32  # --seed + rank may pass numpy's limit
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_lr(step, total_steps, lr, warmup):
    """Linear warmup over `warmup` optimizer steps, then cosine from lr to lr/10 at total_steps."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return lr / 10 + 0.5 * (lr - lr / 10) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------
# Weight files: {out_dir}/{prefix}_{dim}[_moe].pth, a plain state dict as MiniMind writes it, with the
# config that rebuilds it beside it in {...}.json. Always read with weights_only=True.
# ----------------------------------------------------------------------------------------------------
def weight_path(out_dir, prefix, dim, use_moe):
    return os.path.join(out_dir, f"{prefix}_{dim}{'_moe' if use_moe else ''}.pth")


def lora_weight_path(out_dir, lora_name, dim):
    return os.path.join(out_dir, "lora", f"{lora_name}_{dim}.pth")


def config_path(weight_file):
    return weight_file[:-len(".pth")] + ".json"


def unwrap(model):
    return getattr(model, "module", getattr(model, "_orig_mod", model))


@functools.lru_cache(maxsize=4)  # a run saves many times with the same tokenizer
def tokenizer_record_of(tokenizer_path):
    from dataset.lm_dataset import load_tokenizer
    return tokenizer_record(load_tokenizer(tokenizer_path), tokenizer_path)


def save_weights(model, path, dtype="float32", tokenizer_path=None):
    """The weights (without LoRA adapters) and beside them the config .json, which (given tokenizer_path) also
    records the tokenizer they belong to; the pair is replaced together only once both are written, so a
    failed save leaves the previous pair as it was."""
    model = unwrap(model)
    sd, cast = {}, {}  # tensors sharing memory (the tied embed_tokens / lm_head) are cast once and stored once
    for k, v in model.state_dict().items():
        if not k.rsplit(".", 1)[-1].startswith("lora_"):
            if (v.data_ptr(), v.shape) not in cast:
                cast[v.data_ptr(), v.shape] = v.detach().to("cpu", getattr(torch, dtype))
            sd[k] = cast[v.data_ptr(), v.shape]
    config = json.loads(model.config.to_json_string(use_diff=False))
    if tokenizer_path is not None:
        config["tokenizer"] = tokenizer_record_of(tokenizer_path)
    config_json = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
    atomic_write_files({path: lambda f: torch.save(sd, f), config_path(path): lambda f: f.write(config_json)})


def _read_state_dict(path, fix):
    sd = read_torch_file(path, "weight file", fix)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # a resume file
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise UserError(f"{path}: not a weight file (a state dict of tensors); {fix}")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}


def read_weight_config(cfg_path, weight_file, dropout=0.0):
    """The MiniMindConfig in the .json beside a weight file; one clear line when it is not one."""
    fix = (f"it should be the config saved with {weight_file}: restore it, or delete it and pass the model's "
           f"--dim/--n_layers/--n_heads/--n_kv_heads/--use_moe")
    cfg = read_json_file(cfg_path, "model config", fix)
    for k in ("architectures", "transformers_version", "dtype", "torch_dtype", "model_type", "tokenizer"):
        cfg.pop(k, None)
    cfg["dropout"] = dropout
    try:
        return MiniMindConfig(**cfg)
    except Exception as e:  # noqa: BLE001 - ValueError from our checks, TypeError/others from transformers'
        raise UserError(f"{cfg_path}: not a valid model config ({brief(e)}); {fix}") from None


def load_weights(path, args=None, what_makes_it=None, dropout=0.0):
    """Rebuild the model a weight file was saved from (config from the .json beside it, or from the
    flags for a plain MiniMind2 .pth) and load it strictly. Errors are one clear line."""
    if not str(path).endswith(".pth"):
        raise UserError(f"{path}: not a weight file name; weight files end in .pth (with their config in the .json beside them)")
    if not os.path.exists(path):
        hint = f": run {what_makes_it} first" if what_makes_it else ""
        raise UserError(f"{path} not found{hint} (or point --from_weight / --out_dir at an existing weight file)")
    fix = f"run {what_makes_it} again to rewrite it" if what_makes_it else "re-save it or point at another weight file"
    cfg_path = config_path(path)
    from_json = os.path.exists(cfg_path)
    sd = None
    if from_json:
        config = read_weight_config(cfg_path, path, dropout)
        if args is not None and (args.dim, args.n_layers, bool(args.use_moe)) != (config.hidden_size, config.num_hidden_layers, config.use_moe):
            if is_first_rank():
                print(f"note: {path} holds a dim={config.hidden_size} n_layers={config.num_hidden_layers} use_moe={int(config.use_moe)} "
                      f"model (says {cfg_path}); using that (flags said {args.dim}/{args.n_layers}/{int(args.use_moe)})", flush=True)
    elif args is not None:
        sd = _read_state_dict(path, fix)
        if is_minimind3_state_dict(sd):  # its shapes say everything the flags would
            config = config_from_minimind3_state_dict(sd, dropout=dropout)
            if is_first_rank():
                print(f"note: {path} has QK-norm weights: loading it as MiniMind-3 (dim={config.hidden_size} "
                      f"n_layers={config.num_hidden_layers} use_moe={int(config.use_moe)}, sizes read from the weights)", flush=True)
        else:
            config = model_config_from_args(args)
            config.smeared_keys = any(k.endswith("self_attn.key_smear") for k in sd)  # the weights say which
    else:
        raise UserError(f"{cfg_path} not found: cannot tell the model size of {path}; pass --dim/--n_layers/--use_moe")
    sd = sd if sd is not None else _read_state_dict(path, fix)
    model = MiniMindForCausalLM(config)
    own = model.state_dict()
    if "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        model_desc = f"dim={config.hidden_size} n_layers={config.num_hidden_layers} use_moe={int(config.use_moe)}"
        if missing or unexpected:
            detail = f"missing {missing[:2]}, unexpected {unexpected[:2]}"
        else:
            detail = f"{wrong[0][0]} has shape {wrong[0][1]}, the model needs {wrong[0][2]}"
        if from_json:  # the flags played no part: the .json and the .pth disagree
            raise UserError(f"{path} does not fit the {model_desc} model its {cfg_path} describes ({detail}): the .json "
                            f"belongs to another model; restore the matching one, or delete it and pass the model's "
                            f"--dim/--n_layers/--n_heads/--n_kv_heads/--use_moe")
        raise UserError(f"{path} does not fit a {model_desc} model ({detail}); check --dim/--n_layers/--use_moe")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model


def check_weight_tokenizer(path, model, tokenizer_path, tokenizer=None):
    """One clear error when the weight file's .json records another tokenizer than tokenizer_path's; a
    one-line note for a bare .pth (nothing records its tokenizer: MiniMind's own weights need MiniMind's)."""
    from dataset.lm_dataset import load_tokenizer
    cfg_path = config_path(path)
    if not os.path.exists(cfg_path):
        family = "MiniMind-3" if model.config.qk_norm else "MiniMind2"
        if is_first_rank():
            print(f"note: {path} has no .json, so nothing records its tokenizer; using {tokenizer_path}. A published "
                  f"{family} checkpoint needs {family}'s tokenizer (--tokenizer_path; see the README, 'Coming from MiniMind')", flush=True)
        return
    record = read_json_file(cfg_path, "model config", f"it should be the config saved with {path}").get("tokenizer")
    if record:
        problem = tokenizer_mismatch(record, tokenizer or load_tokenizer(tokenizer_path), tokenizer_path, path)
        if problem:
            raise UserError(problem)


def is_weight_path(name):
    """A weight file is named by its path (ends in .pth or has a folder) or by its stage prefix (grpo, reason, ...)."""
    return name.endswith(".pth") or os.sep in name


def resolve_weight(args, name):
    """--from_weight is a stage prefix in --out_dir or a path. Returns (path, script that makes it)."""
    if is_weight_path(name):
        return name, None
    return weight_path(args.out_dir, name, args.dim, args.use_moe), STAGE_SCRIPTS.get(name)


def load_from_weight(args, name=None, finite=False):
    """The model this stage starts from (--from_weight), loaded strictly. finite: refuse weights holding NaN/inf
    (a stage that samples from the model, such as RL, cannot even start with them)."""
    name = name or args.from_weight
    if name == "none":  # MiniMind's spelling for "from scratch"
        return MiniMindForCausalLM(model_config_from_args(args))
    path, maker = resolve_weight(args, name)
    model = load_weights(path, args=args, what_makes_it=maker, dropout=args.dropout)
    check_weight_tokenizer(path, model, args.tokenizer_path)
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()] if finite else []
    if bad:
        raise UserError(f"{path}: {len(bad)} tensor(s) hold NaN or inf values (first: {bad[0]}), so no reply can be "
                        f"sampled from it; it comes from a run that diverged: retrain {maker or 'that stage'} or pick other weights")
    return model


def check_out_dir(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out_dir {out_dir} is not writable ({e.strerror}); choose another folder") from None


# ----------------------------------------------------------------------------------------------------
# Data loading: DistributedSampler (one replica when not distributed) whose first `skip` indices of an
# epoch can be dropped, so a resumed run sees exactly the batches an uninterrupted one would.
# ----------------------------------------------------------------------------------------------------
class ResumableSampler(torch.utils.data.Sampler):
    """Every sample once an epoch, as MiniMind's loaders do: under DDP the last few repeat so each rank gets as
    many; the epoch's last batch may be smaller than --batch_size."""
    def __init__(self, dataset, ctx, seed, shuffle=True):
        self.inner = torch.utils.data.DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank,
                                                         shuffle=shuffle, seed=seed, drop_last=False)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(self.inner)[self.skip:])

    def __len__(self):
        return len(self.inner) - self.skip


def make_loader(dataset, args, ctx, collate_fn):
    """A loader whose batches come as (batch, number of its samples with nothing to learn); with
    --skip_bad_lines those samples are left out of the batch (see counting_collate)."""
    if len(dataset) == 0:
        raise UserError(f"{args.data_path}: no samples to train on")
    sampler = ResumableSampler(dataset, ctx, args.seed)
    workers = args.num_workers
    if workers is None:
        per_process = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        workers = max(1, min(8, per_process)) if ctx.cuda else 1
    # The loader's own generator seeds its workers, so starting an epoch does not draw from the global RNG
    # (RL samples replies from it; a resumed run must continue the same stream).
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=False,
                                         num_workers=workers, collate_fn=counting_collate(collate_fn, args.skip_bad_lines),
                                         pin_memory=ctx.cuda, persistent_workers=False,
                                         generator=torch.Generator().manual_seed(args.seed))
    return loader, sampler


def step_batches(loader, sampler, state, steps_per_epoch, total_steps, args):
    """For each optimizer step left in the run, the list of its --accumulation_steps batches, each as
    (batch, samples in it with nothing to learn). The caller counts state["step"]; the epoch (and, after a
    resume, the place in it) is kept here."""
    while state["step"] < total_steps:
        state["epoch"] = state["step"] // steps_per_epoch
        done_in_epoch = state["step"] - state["epoch"] * steps_per_epoch
        sampler.set_epoch(state["epoch"], skip=done_in_epoch * args.accumulation_steps * args.batch_size)
        it = iter(loader)
        for _ in range(min(steps_per_epoch - done_in_epoch, total_steps - state["step"])):
            yield list(itertools.islice(it, args.accumulation_steps))  # an epoch's last step takes what is left


# ----------------------------------------------------------------------------------------------------
# Is there anything to learn? A sample is (input_ids, labels, ...) or a dict with "*labels" entries; -100
# marks a position with nothing to learn, and the model predicts labels[1:]. A sample whose labels are all
# cut off by --max_seq_len (a prompt longer than that, or a window too short) teaches nothing, and a run of
# only such samples would print loss 0 and save untrained weights. Data without labels is not checked.
# ----------------------------------------------------------------------------------------------------
IGNORE_INDEX = -100
LABEL_CHECK_SAMPLES = 512


def label_tensors(sample):
    """The label tensors of a sample or a collated batch ([] if it has none)."""
    if isinstance(sample, dict):
        return [v for k, v in sample.items() if k.endswith("labels") and torch.is_tensor(v)]
    if (isinstance(sample, (tuple, list)) and len(sample) >= 2 and torch.is_tensor(sample[0]) and torch.is_tensor(sample[1])
            and sample[0].shape == sample[1].shape):
        return [sample[1]]
    return []


def has_target(sample):
    """True if every labelled sequence of the sample has a token to predict (and for unlabelled samples)."""
    return all(bool((labels[1:] != IGNORE_INDEX).any()) for labels in label_tensors(sample))


def batch_targets(batch):
    """How many positions of a collated batch carry a label (a tensor), or None for a batch without labels."""
    labels = label_tensors(batch)
    return sum((t[:, 1:] != IGNORE_INDEX).sum() for t in labels) if labels else None


def counting_collate(collate_fn, skip):
    """collate_fn that also returns how many of the batch's samples have nothing to learn. With skip
    (--skip_bad_lines) they are left out, unless all of them are: a batch keeps its place in the data order,
    and the training loop skips a step whose batches carry no label."""
    def collate(samples):
        learnable = [has_target(s) for s in samples]
        empty = learnable.count(False)
        if skip and 0 < empty < len(samples):
            samples = [s for s, ok in zip(samples, learnable) if ok]
        return collate_fn(samples), empty
    return collate


def check_learnable(dataset, args, ctx):
    """Before training: do the samples keep a labelled token within --max_seq_len? All samples of a small
    data set are looked at, LABEL_CHECK_SAMPLES seeded random ones of a big one (tokenizing every line of a
    multi-GB file here would double the cost of the index pass; the training loop counts the rest as they
    come). No sample with a label: an error, with or without --skip_bad_lines. Some without: a warning naming
    the first (truncating a few long samples is normal with real data), and they are counted while training;
    with --skip_bad_lines they are also left out of their batches."""
    n = len(dataset)
    exhaustive = n <= LABEL_CHECK_SAMPLES
    indices = range(n) if exhaustive else np.sort(np.random.default_rng(args.seed).choice(n, LABEL_CHECK_SAMPLES, replace=False))
    empty = []
    for i in indices:
        sample = dataset[int(i)]
        if not label_tensors(sample):
            return  # data without labels: nothing to check
        if not has_target(sample):
            empty.append(int(i))
    if not empty:
        return
    where = dataset.where(empty[0]) if hasattr(dataset, "where") else f"{args.data_path}: sample {empty[0]}"
    share = f"{len(empty)} of the {len(indices)} samples{'' if exhaustive else ' checked'}"
    window = f"--max_seq_len {args.max_seq_len}"
    if len(empty) == len(indices):
        raise UserError(f"{args.data_path}: nothing to learn: {share} have no labelled token within {window} (first: {where}); "
                        f"the prompts are longer than that or the window is too short: raise --max_seq_len")
    what = ("they are skipped and counted (--skip_bad_lines)" if args.skip_bad_lines else
            "they add nothing to the loss: raise --max_seq_len, or pass --skip_bad_lines 1 to leave them out of their batches")
    ctx.print(f"warning: {share} have no labelled token within {window}, their prompts fill it (first: {where}); {what}")


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return tuple(v.to(device, non_blocking=True) for v in batch)


# ----------------------------------------------------------------------------------------------------
# Logging: a line per --log_interval steps, a jsonl of the same numbers under out_dir/logs, wandb.
# ----------------------------------------------------------------------------------------------------
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40": 181e12,
                   "4090": 165e12, "3090": 71e12, "A10": 125e12, "V100": 125e12, "T4": 65e12}


def device_peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(config, seq_len):
    """Training FLOPs per token: 6 x (active non-embedding + lm_head params) + attention."""
    H, L = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    ffn = 3 * H * config.intermediate_size
    if config.use_moe:
        ffn = config.num_experts_per_tok * 3 * H * config.moe_intermediate_size + config.n_shared_experts * ffn
    q = config.num_attention_heads * config.head_dim
    per_layer = 2 * H * q + 2 * H * kv + ffn
    n = L * per_layer + H * config.vocab_size
    return 6 * n + 12 * L * H * seq_len


class Logger:
    def __init__(self, args, ctx, stage, run_state):
        self.ctx, self.args = ctx, args
        self.path = None
        self.wandb = None
        if not ctx.is_master:
            return
        os.makedirs(os.path.join(args.out_dir, "logs"), exist_ok=True)
        self.path = os.path.join(args.out_dir, "logs", f"{args.save_weight}_{args.dim}{'_moe' if args.use_moe else ''}.jsonl")
        if not run_state.get("resumed") and os.path.exists(self.path):
            os.remove(self.path)
        if args.use_wandb:
            import wandb  # optional: only needed with --use_wandb
            if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
                os.environ["WANDB_MODE"] = "offline"
            run_id = run_state.get("wandb_id") or uuid.uuid4().hex[:12]
            run_state["wandb_id"] = run_id
            self.wandb = wandb.init(project=args.wandb_project, id=run_id, resume="allow", dir=args.out_dir,
                                    name=f"{stage}-{args.dim}", config=vars(args))

    def log(self, record):
        if not self.ctx.is_master:
            return
        def fmt(v):
            if isinstance(v, float):
                return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
            return str(v)
        parts = [f"{k} {fmt(v)}" for k, v in record.items() if k != "eta_s"]
        eta = record.get("eta_s")
        if eta is not None:
            parts.append(f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
        print(" | ".join(parts), flush=True)
        if self.path is not None:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # rank 0 alone writes logs: stopping here would leave the other ranks hanging
                print(f"warning: {describe_os_error(e, self.path, writing=True)}; the log file is not written from now on",
                      file=sys.stderr, flush=True)
                self.path = None
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


# ----------------------------------------------------------------------------------------------------
# The training loop. `loss_fn(model, batch) -> (loss, metrics dict of scalar tensors)` is the stage's
# own idea, defined in its script; everything else happens here.
# ----------------------------------------------------------------------------------------------------
def resume_path(args):
    return weight_path(args.out_dir, args.save_weight, args.dim, args.use_moe)[:-len(".pth")] + "_resume.pth"


def count_steps(loader, args):
    """(optimizer steps per epoch, optimizer steps in the run) from --epochs, --accumulation_steps, --max_steps."""
    steps_per_epoch = math.ceil(len(loader) / args.accumulation_steps)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    return steps_per_epoch, total_steps


def new_run_state(args, ctx, total_steps, n_samples, **shape):
    """The loop state a resume file carries. run_shape is what fixes the data order and the schedule (plus
    any stage-specific `shape`): a resume with other values would not continue the same run."""
    run_shape = {"batch_size": args.batch_size, "accumulation_steps": args.accumulation_steps, "world_size": ctx.world,
                 "total_steps": total_steps, "seed": args.seed, "samples": n_samples, **shape}
    return {"epoch": 0, "step": 0, "optimizer_steps": 0, "resumed": False, "run_shape": run_shape}


def make_optimizer(params, args, ctx):
    """AdamW; fused on CUDA (one kernel for all parameters instead of several per parameter)."""
    return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay, betas=(0.9, 0.95), fused=ctx.cuda)


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr


def wrap_ddp(model, ctx):
    if not ctx.ddp:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.cuda else None)


def load_resume(args, ctx, state, parts, total_steps):
    """--resume: restore `parts` (name in the file -> module or optimizer), the GradScaler, the loop state and
    this rank's RNG from the resume file; state["run_shape"] must equal the saved one. Any problem with the
    file is one line; nothing is written. Then refuse a run that would take no step."""
    rpath = resume_path(args)
    if args.resume and not os.path.exists(rpath):
        ctx.print(f"no resume file at {rpath}; starting fresh")
    elif args.resume:
        fix = "delete it to start fresh, or run without --resume"
        ck = read_torch_file(rpath, "resume file", fix)
        saved = ck.get("state") if isinstance(ck, dict) else None
        if (not isinstance(saved, dict) or not all(k in ck for k in ("model", "optimizer", "scaler", "rng"))
                or not isinstance(saved.get("step"), int) or not isinstance(saved.get("epoch"), int) or not ck["rng"]):
            raise UserError(f"{rpath}: not a resume file written by these scripts (no model/optimizer/state entries); {fix}")
        saved_shape = saved.get("run_shape", state["run_shape"])
        if saved_shape != state["run_shape"]:
            diff = ", ".join(f"{k} {saved_shape.get(k)} -> {v}" for k, v in state["run_shape"].items() if saved_shape.get(k) != v)
            raise UserError(f"{rpath} was written by a run with other settings ({diff}); resume with the same flags, "
                            f"data and number of processes, or delete it to start fresh")
        missing = [name for name in parts if name not in ck]
        if missing:
            raise UserError(f"{rpath} holds no {', '.join(missing)}: another script wrote it; {fix}")
        try:
            for name, obj in parts.items():
                unwrap(obj).load_state_dict(ck[name])  # modules load strictly
            ctx.scaler.load_state_dict(ck["scaler"])
            restore_rng(ck["rng"][ctx.rank] if ctx.rank < len(ck["rng"]) else ck["rng"][0])
        except Exception as e:  # noqa: BLE001 - another model or stage wrote it, or an entry is damaged
            raise UserError(f"{rpath} does not fit this run ({brief(e)}); {fix}") from None
        state.update(saved, resumed=True)
        state["optimizer_steps"] = saved.get("optimizer_steps", saved["step"])  # files from before this was counted
        ctx.print(f"resumed from {rpath} at optimizer step {state['step']}")
    if state["step"] >= total_steps:
        raise UserError(f"{rpath} is from a run that already finished (step {state['step']} of {total_steps}): nothing to "
                        f"resume; drop --resume to train again, or delete the file")
    if args.stop_at_step and args.stop_at_step <= state["step"]:
        raise UserError(f"--stop_at_step {args.stop_at_step} is not after step {state['step']}, where the resumed run "
                        f"stands; raise it or drop it")


def save_checkpoint(args, ctx, state, parts, save_fn=None):
    """The stage's weight file (save_fn(model) writes it and returns its path) and the resume file: `parts`,
    GradScaler, loop state and every rank's RNG, so a resumed run continues each rank's stream. Nothing is
    written before the first optimizer step: the weights are still the ones loaded, never written over a file."""
    if state["optimizer_steps"] == 0:
        return
    rng = [rng_state()]
    if ctx.ddp:
        rng = [None] * ctx.world
        dist.all_gather_object(rng, rng_state())

    def write():  # rank 0 only; its errors (a full disk) reach every rank through on_master
        model = unwrap(parts["model"])
        if save_fn is None:
            path = weight_path(args.out_dir, args.save_weight, args.dim, args.use_moe)
            save_weights(model, path, args.save_dtype, tokenizer_path=args.tokenizer_path)
        else:
            path = save_fn(model)
        state["saved"] = path
        ck = {name: ({k: v.detach().cpu() for k, v in unwrap(obj).state_dict().items()} if isinstance(obj, torch.nn.Module)
                     else obj.state_dict()) for name, obj in parts.items()}
        ck.update(scaler=ctx.scaler.state_dict(), state={k: v for k, v in state.items() if k != "resumed"}, rng=rng)
        atomic_torch_save(ck, resume_path(args))
    ctx.on_master(write)


class SkippedSteps:
    """Counts optimizer steps skipped for a non-finite loss (stopping the run after --max_nonfinite in a
    row) or for having no labelled token on any rank."""
    def __init__(self, max_in_row):
        self.max_in_row, self.in_row, self.nonfinite, self.unlabelled = max_in_row, 0, 0, 0

    def record(self):
        return {**({"skipped_steps": self.nonfinite} if self.nonfinite else {}),
                **({"unlabelled_steps": self.unlabelled} if self.unlabelled else {})}


def optimizer_step(ctx, state, optimizers, grad_clip, skips, bad, targets=None):
    """Finish optimizer step state["step"] + 1. One host sync tells every rank whether any rank's loss was
    non-finite (`bad` > 0) and whether any rank had a labelled token (`targets` > 0; None: always). If not,
    all drop the gradients (a zero gradient would still move the weights through AdamW's momentum and weight
    decay); else all unscale (float16), clip and step. optimizers: list of (optimizer, its params).
    Counts taken steps in state["optimizer_steps"]; returns True if the step was taken."""
    flags = torch.stack([bad.float(), torch.ones((), device=bad.device) if targets is None else (targets > 0).float()])
    nonfinite, learnable = ctx.all_reduce_max(flags).tolist()
    if nonfinite > 0 or learnable == 0:
        for opt, _ in optimizers:
            opt.zero_grad(set_to_none=True)
        if nonfinite > 0:
            skips.in_row += 1
            skips.nonfinite += 1
            ctx.print(f"step {state['step'] + 1}: non-finite loss, step skipped ({skips.in_row} in a row)")
            if skips.in_row >= skips.max_in_row:
                raise UserError(f"loss was NaN/inf for {skips.in_row} optimizer steps in a row; lower --learning_rate, "
                                f"try --dtype bfloat16 or float32, or check the data")
        else:
            skips.unlabelled += 1
        return False
    skips.in_row = 0
    taken = take_optimizer_step(optimizers, ctx.scaler, grad_clip)
    state["optimizer_steps"] += taken
    return taken


def take_optimizer_step(optimizers, scaler, grad_clip):
    """Unscale (float16), clip and step each (optimizer, its params), update the GradScaler once, clear the
    gradients. Returns False when the float16 GradScaler skipped the step (its gradients overflowed)."""
    scale = scaler.get_scale() if scaler.is_enabled() else None
    for opt, params in optimizers:
        if grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(opt)
    scaler.update()
    for opt, _ in optimizers:
        opt.zero_grad(set_to_none=True)
    return scale is None or scaler.get_scale() >= scale  # the scale drops only when the step was skipped


class RunningMeans:
    """Sums of the numbers logged between two log lines; `read` averages each over the times it was added
    and over the ranks (one sync for all of them)."""
    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, metrics):
        for k, v in metrics.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            self.sums[k] = self.sums.get(k, 0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def read(self, ctx):
        if not self.sums:
            return {}
        keys = list(self.sums)
        means = torch.stack([torch.as_tensor(self.sums[k], device=ctx.device).float() / self.counts[k] for k in keys])
        means = ctx.all_reduce_mean(means).tolist()
        self.sums, self.counts = {}, {}
        return {k: round(v, 6) for k, v in zip(keys, means)}


def after_step(args, ctx, state, total_steps, parts, logger, record_fn, started, skips, save_fn=None):
    """What a loop does after its step counter moved: log record_fn() every --log_interval steps and at the
    end (with the skipped steps, and an ETA from started = (time, step) at the loop's start), save every
    --save_interval steps. Returns True when --stop_at_step says to stop here."""
    step = state["step"]
    if step % args.log_interval == 0 or step == total_steps:
        rate = (step - started[1]) / max(time.time() - started[0], 1e-9)
        record = {"step": step, "epoch": state["epoch"] + 1, **record_fn(), **skips.record(),
                  "eta_s": round((total_steps - step) / max(rate, 1e-9), 1)}
        if ctx.cuda:
            record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(ctx.device) / 2**30, 3)
        logger.log(record)
    if step % args.save_interval == 0 and step != total_steps:
        save_checkpoint(args, ctx, state, parts, save_fn)
    return bool(args.stop_at_step and step >= args.stop_at_step and step != total_steps)


def end_run(args, ctx, state, total_steps, parts, logger, stopped_early, skips, save_fn=None):
    """The final save (also when --stop_at_step stopped the run early) and the closing line; a run that took
    no optimizer step is an error and writes nothing."""
    if state["optimizer_steps"] == 0:
        logger.finish()
        causes = [f"{skips.nonfinite} with a non-finite loss (lower --learning_rate)"] if skips.nonfinite else []
        causes += [f"{skips.unlabelled} with no labelled token (raise --max_seq_len)"] if skips.unlabelled else []
        raise UserError(f"no optimizer step was taken in {state['step']} step(s): {', '.join(causes) or 'all skipped'}; "
                        f"no weight file was written (an existing one is unchanged)")
    save_checkpoint(args, ctx, state, parts, save_fn)
    logger.finish()
    if stopped_early:
        ctx.print(f"stopped at step {state['step']} of {total_steps} (--stop_at_step); continue with --resume 1")
    else:
        ctx.print(f"saved {state.get('saved')}")


def train(args, ctx, model, dataset, collate_fn, loss_fn, stage, trainable_params=None, save_fn=None):
    """Run every epoch: accumulation with no_sync, clipping, LR schedule, non-finite skip, logging,
    periodic and final saves, resume. save_fn(model) writes the stage's weight file and returns its path.

    Two rules keep a user's files safe: a run that would take no step is refused before it starts, and the
    weight file is written only once an optimizer step has been taken (a step whose loss is non-finite, or
    whose batches carry no label on any rank, is skipped, not taken)."""
    check_out_dir(args.out_dir)
    model.to(ctx.device)
    params = trainable_params if trainable_params is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args, ctx)
    loader, sampler = make_loader(dataset, args, ctx, collate_fn)
    steps_per_epoch, total_steps = count_steps(loader, args)
    state = new_run_state(args, ctx, total_steps, len(dataset))
    parts = {"model": model, "optimizer": optimizer}
    load_resume(args, ctx, state, parts, total_steps)
    check_learnable(dataset, args, ctx)

    ddp_model = wrap_ddp(model, ctx)
    use_compile = (ctx.cuda and model_minimind.can_compile_for_cuda()) if args.compile is None else args.compile
    if use_compile and args.compile is None:
        # On by default: where this machine cannot compile after all, run eager (torch warns) rather than stop.
        # An explicit --compile 1 keeps compile errors as errors.
        torch._dynamo.config.suppress_errors = True
    forward_model = torch.compile(ddp_model) if use_compile else ddp_model
    logger = Logger(args, ctx, stage, state)
    n_params = count_parameters(unwrap(model))
    n_train = sum(p.numel() for p in params)
    ctx.print(f"{stage}: {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.3f}M trained), {len(dataset)} samples, "
              f"{ctx.world} process(es), {total_steps} optimizer steps, device {ctx.device}, dtype {ctx.dtype}, "
              f"compile {'on' if use_compile else 'off'}")
    peak = device_peak_flops(ctx.device)
    fpt = flops_per_token(unwrap(model).config, args.max_seq_len)

    model.train()
    skips = SkippedSteps(args.max_nonfinite)
    unlabelled_samples = torch.zeros((), device=ctx.device)  # samples with nothing to learn, this rank
    t0, tokens_since, wait_s = time.time(), 0, 0.0
    nonpad_since = torch.zeros((), device=ctx.device, dtype=torch.long)
    started = (t0, state["step"])
    means = RunningMeans()
    stopped_early = False

    def log_record():
        dt = time.time() - t0
        tok_s = tokens_since * ctx.world / max(dt, 1e-9)
        m = means.read(ctx)
        record = {"loss": m.pop("loss"), "lr": lr, **m, "tokens_per_s": round(tok_s, 1),
                  "nonpad_tokens_per_s": round(ctx.all_reduce_mean(nonpad_since.float()).item() * ctx.world / max(dt, 1e-9), 1),
                  "data_wait": round(wait_s / max(dt, 1e-9), 4)}
        if peak:
            record["mfu"] = round(tok_s * fpt / (peak * ctx.world), 4)
        return record

    batches_of_steps = step_batches(loader, sampler, state, steps_per_epoch, total_steps, args)
    t_wait = time.time()
    for batches in batches_of_steps:
        wait_s += time.time() - t_wait  # the loader's time for this step's batches
        lr = get_lr(state["step"], total_steps, args.learning_rate, args.warmup_iters)
        set_lr(optimizer, lr)
        bad = torch.zeros((), device=ctx.device)
        targets = torch.zeros((), device=ctx.device)  # labelled positions in this step's batches
        for micro, (batch, n_unlabelled) in enumerate(batches):
            batch = to_device(batch, ctx.device)
            unlabelled_samples += n_unlabelled
            n_targets = batch_targets(batch)
            targets += 1 if n_targets is None else n_targets
            last = micro == len(batches) - 1
            # Gradients are all-reduced only on the last micro-batch of an accumulation.
            with ddp_model.no_sync() if (ctx.ddp and not last) else contextlib.nullcontext():
                with ctx.autocast:
                    loss, metrics = loss_fn(forward_model, batch)
                bad = torch.maximum(bad, (~torch.isfinite(loss.detach())).float())
                ctx.scaler.scale(loss / len(batches)).backward()
            means.add({"loss": loss, **metrics})
            tokens_since += batch_tokens(batch)
            nonpad_since += batch_nonpad_tokens(batch)
        optimizer_step(ctx, state, [(optimizer, params)], args.grad_clip, skips, bad, targets)
        state["step"] += 1
        if after_step(args, ctx, state, total_steps, parts, logger, log_record, started, skips, save_fn):
            stopped_early = True
            break
        if state["step"] % args.log_interval == 0:  # the rates cover the steps since the last log line
            t0, tokens_since, wait_s = time.time(), 0, 0.0
            nonpad_since.zero_()
        t_wait = time.time()
    n_unlabelled = round(ctx.all_reduce_mean(unlabelled_samples).item() * ctx.world)
    if n_unlabelled:
        what = "skipped (--skip_bad_lines)" if args.skip_bad_lines else \
            "they added nothing to the loss (--skip_bad_lines 1 leaves them out of their batches)"
        ctx.print(f"note: {n_unlabelled} sample(s) read (each epoch counts) had no labelled token within --max_seq_len "
                  f"{args.max_seq_len}; {what}")
    end_run(args, ctx, state, total_steps, parts, logger, stopped_early, skips, save_fn)
    return weight_path(args.out_dir, args.save_weight, args.dim, args.use_moe)


def batch_tokens(batch):
    if isinstance(batch, dict):
        return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))
    return batch[0].numel()


def batch_nonpad_tokens(batch, pad_id=0):
    if isinstance(batch, dict):
        return sum((v != pad_id).sum() for k, v in batch.items() if k.endswith("input_ids"))
    return (batch[0] != pad_id).sum()


def rng_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(s):
    random.setstate(s["python"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
