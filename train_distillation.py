"""White-box knowledge distillation: a big teacher's next-token distributions teach a small student.

    python train_distillation.py --data_path dataset/sft_mini_512.jsonl    # the 104M full_sft model teaches the 26M one
Loads the student from out/full_sft_{dim}[_moe].pth (--from_weight) and a frozen teacher from
out/{teacher_weight}_{teacher_dim}[_moe].pth (its size from the .json beside it); writes out/full_dist_{dim}[_moe].pth.
On chat data, at the assistant's positions only (where SFT takes its loss):

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The labels say which token is right; the teacher's distribution also says how wrong every other token is,
which is far more signal per position. T > 1 softens both distributions so the teacher's small
probabilities count; T^2 keeps that part's gradients on the scale of the CE part whatever T is.
"""
import argparse
import functools
import os

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dataset.lm_dataset import SFTDataset, load_tokenizer, make_collate, make_pack_collate
from model.model_minimind import count_parameters
from trainer_utils import (Context, UserError, add_bool, build_parser, load_from_weight, load_weights, positive_int,
                           resolve_weight, run_main, str2bool, train)

KL_CHUNK_ROWS = 1024  # positions whose full-vocabulary log-probs exist at once


def labelled_positions(labels):
    """Bool [B, T]: positions whose next token carries a label (logits at t predict labels[t + 1])."""
    return F.pad(labels[:, 1:], (0, 1), value=-100) != -100


def kl_per_position(student_logits, teacher_logits, temperature):
    """KL(p_teacher || p_student) of each row [N, V] -> [N], both softened by the temperature, in fp32."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def distillation_loss(student_logits, teacher_logits, temperature, chunk_rows=KL_CHUNK_ROWS):
    """T^2 x mean KL over the rows of [N, V] logits. A chunk of rows at a time, recomputed in the backward
    pass (checkpoint): the fp32 log-probs of both models exist for one chunk, never for the whole batch."""
    total = student_logits.new_zeros((), dtype=torch.float32)
    for student_chunk, teacher_chunk in zip(student_logits.split(chunk_rows), teacher_logits.split(chunk_rows)):
        total = total + checkpoint(kl_per_position, student_chunk, teacher_chunk, temperature, use_reentrant=False).sum()
    return temperature ** 2 * total / max(student_logits.shape[0], 1)  # no labelled position: 0, like the CE


@torch.no_grad()
def teacher_logits_at(teacher, input_ids, position_ids, where):
    """The teacher's logits at the labelled positions only: its body runs on the whole batch, its
    vocabulary-sized head only where the loss looks."""
    hidden = teacher.model(input_ids, position_ids=position_ids, packed=position_ids is not None)[0]
    return teacher.lm_head(hidden[where])


def distill_batch_loss(model, batch, teacher, alpha, temperature):
    input_ids, labels = batch[0], batch[1]
    position_ids = batch[2] if len(batch) == 3 else None  # --packing: positions restart at every sample
    out = model(input_ids, labels=labels, position_ids=position_ids, packed=position_ids is not None)
    where = labelled_positions(labels)
    kd = distillation_loss(out.logits[where], teacher_logits_at(teacher, input_ids, position_ids, where), temperature)
    loss = alpha * out.loss + (1 - alpha) * kd  # out.loss: the SFT cross-entropy on the same positions
    return loss + out.aux_loss, {"ce": out.loss, "kd": kd}


def load_teacher(args, ctx):
    """The frozen teacher: --teacher_weight is a stage prefix (sized by --teacher_dim/--teacher_use_moe) or a
    .pth; its size comes from the .json beside it (the --teacher_* flags size a plain .pth without one)."""
    teacher_args = argparse.Namespace(**{**vars(args), "dim": args.teacher_dim, "n_layers": args.teacher_n_layers,
                                         "use_moe": args.teacher_use_moe})
    path, maker = resolve_weight(teacher_args, args.teacher_weight)
    if not os.path.exists(path):
        made_by = f"run {maker} --dim {args.teacher_dim} first, or " if maker else ""
        raise UserError(f"teacher {path} not found: {made_by}point --teacher_weight (a stage prefix or .pth) and "
                        f"--teacher_dim/--teacher_use_moe at the teacher's weight file")
    has_config = os.path.exists(path[:-len(".pth")] + ".json")
    teacher = load_weights(path, args=None if has_config else teacher_args)
    # Frozen, in the training dtype (bf16/fp16 on CUDA): half the memory of fp32, and autocast computes in it anyway.
    teacher.to(ctx.device, ctx.dtype).eval().requires_grad_(False)
    return teacher, path


def main():
    parser = build_parser("MiniMind white-box knowledge distillation", out_weight="full_dist", epochs=6, batch_size=32,
                          learning_rate=5e-6, max_seq_len=512, data_path="dataset/sft_mini_512.jsonl",
                          from_weight="full_sft", packing=True, data_column="conversations")
    g = parser.add_argument_group("distillation (the student is --from_weight at --dim/--n_layers/--use_moe)")
    g.add_argument("--teacher_weight", default="full_sft",
                   help="the frozen teacher: a stage prefix in --out_dir (pretrain, full_sft, rlhf, reason) or a .pth path")
    g.add_argument("--teacher_dim", type=int, default=768, help="teacher's hidden size, naming the file of a stage prefix (768: 104M)")
    g.add_argument("--teacher_n_layers", type=int, default=16,
                   help="teacher's layers; only read for a plain .pth without the .json that states its size")
    add_bool(g, "--teacher_use_moe", help="the teacher is a mixture-of-experts model (names the file of a stage prefix)")
    g.add_argument("--alpha", type=float, default=0.5, help="weight of the CE part; 1 - alpha weighs the teacher's (1: plain SFT)")
    g.add_argument("--temperature", type=float, default=1.0, help="softens both distributions in the KL part (1: as they are)")
    g = parser.add_argument_group("MiniMind-3's names for the flags above (its train_distillation.py command lines run as they are)")
    for alias, flag, kind in [("--student_hidden_size", "dim", positive_int), ("--student_num_layers", "n_layers", positive_int),
                              ("--student_use_moe", "use_moe", str2bool), ("--from_student_weight", "from_weight", str),
                              ("--teacher_hidden_size", "teacher_dim", positive_int),
                              ("--teacher_num_layers", "teacher_n_layers", positive_int), ("--from_teacher_weight", "teacher_weight", str)]:
        g.add_argument(alias, dest=flag, type=kind, default=argparse.SUPPRESS, help=f"= --{flag}",
                       metavar="0|1" if kind is str2bool else None)
    args = parser.parse_args()
    if not 0 <= args.alpha <= 1:
        raise UserError(f"--alpha {args.alpha}: must be between 0 (teacher only) and 1 (labels only)")
    if args.temperature <= 0:
        raise UserError(f"--temperature {args.temperature}: must be above 0")
    ctx = Context(args)
    tokenizer = load_tokenizer(args.tokenizer_path)
    dataset = SFTDataset(args.data_path, tokenizer, max_length=args.max_seq_len, skip_bad_lines=args.skip_bad_lines,
                         conversations_column=args.conversations_column)
    model = load_from_weight(args)
    teacher, teacher_path = load_teacher(args, ctx)
    if teacher.config.vocab_size != model.config.vocab_size:
        raise UserError(f"teacher {teacher_path} has a {teacher.config.vocab_size}-token vocabulary but the student "
                        f"{resolve_weight(args, args.from_weight)[0]} has {model.config.vocab_size}: distillation compares "
                        f"their next-token distributions token by token, so both must be trained with the same tokenizer")
    ctx.print(f"teacher: {count_parameters(teacher) / 1e6:.2f}M parameters, frozen ({teacher_path}); "
              f"alpha {args.alpha}, temperature {args.temperature}")

    collate = make_pack_collate(args.max_seq_len) if args.packing else make_collate(tokenizer.pad_token_id)
    loss_fn = functools.partial(distill_batch_loss, teacher=teacher, alpha=args.alpha, temperature=args.temperature)
    train(args, ctx, model, dataset, collate, loss_fn, stage="distillation")


if __name__ == "__main__":
    run_main(main)
