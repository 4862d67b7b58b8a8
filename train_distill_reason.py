"""Stage 4, reasoning distillation: SFT on <think>...</think><answer>...</answer> replies.

    python train_distill_reason.py --data_path dataset/r1_mix_1024.jsonl
Loads out/rlhf_{dim}.pth, writes out/reason_{dim}[_moe].pth. Small models drift off the reply template,
so the four tag tokens get --special_token_weight times the loss of ordinary reply tokens.
"""
import functools

import torch
import torch.nn.functional as F

from dataset.lm_dataset import SFTDataset, load_tokenizer, make_collate
from trainer_utils import Context, build_parser, load_from_weight, run_main, train

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def tag_weights(labels, tag_ids, special_token_weight):
    """Per-position loss weights aligned with the shifted targets: 1 on labelled tokens, the special weight
    on labelled tag tokens, 0 elsewhere (prompt, template and padding never get weight)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    labelled = targets != -100
    weights = labelled.float()
    weights[labelled & torch.isin(targets, tag_ids)] = special_token_weight
    return targets, weights, labelled


def reason_loss(model, batch, tag_ids, special_token_weight):
    input_ids, labels = batch
    out = model(input_ids)
    targets, weights, labelled = tag_weights(labels, tag_ids, special_token_weight)
    token_loss = F.cross_entropy(out.logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    # normalised by the unweighted count, so the tags add loss rather than dilute the rest
    loss = (token_loss * weights).sum() / labelled.sum().clamp(min=1)
    return loss + out.aux_loss, {}


def main():
    parser = build_parser("MiniMind reasoning distillation", out_weight="reason", epochs=1, batch_size=8,
                          learning_rate=1e-6, max_seq_len=1024, data_path="dataset/r1_mix_1024.jsonl", from_weight="rlhf",
                          data_column="conversations")
    g = parser.add_argument_group("reasoning")
    g.add_argument("--special_token_weight", type=float, default=10.0, help="loss weight of <think>/</think>/<answer>/</answer>")
    args = parser.parse_args()
    ctx = Context(args)
    tokenizer = load_tokenizer(args.tokenizer_path)
    dataset = SFTDataset(args.data_path, tokenizer, max_length=args.max_seq_len, skip_bad_lines=args.skip_bad_lines,
                         conversations_column=args.conversations_column)
    model = load_from_weight(args)
    tag_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(TAGS)), device=ctx.device)

    loss_fn = functools.partial(reason_loss, tag_ids=tag_ids, special_token_weight=args.special_token_weight)
    train(args, ctx, model, dataset, make_collate(tokenizer.pad_token_id), loss_fn, stage="reason")


if __name__ == "__main__":
    run_main(main)
