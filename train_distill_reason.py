"""Stage 4, reasoning distillation: SFT on <think>...</think><answer>...</answer> replies.

    python train_distill_reason.py --data_path dataset/r1_mix_1024.jsonl
Loads out/rlhf_{dim}.pth, writes out/reason_{dim}[_moe].pth. Small models drift off the reply template,
so the tags get --special_token_weight times the loss of ordinary reply tokens. A tag is found as the
token sequence the tokenizer encodes it to: one token in ours, several in MiniMind2's.
"""
import functools

import torch
import torch.nn.functional as F

from dataset.lm_dataset import SFTDataset, load_tokenizer, make_collate
from trainer_utils import Context, UserError, build_parser, load_from_weight, nonneg_float, run_main, train

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
TAG_CHECK_SAMPLES = 200  # the data must show a tag in the replies of its first this many samples


def tag_sequences(tokenizer, device=None):
    """{tag: its token ids as a tensor}, as the tokenizer encodes the tag on its own."""
    return {tag: torch.tensor(tokenizer.encode(tag, add_special_tokens=False), device=device) for tag in TAGS}


def tag_positions(targets, sequences):
    """Bool mask, True at every position of `targets` [B, T] that lies inside one of the id sequences."""
    mask = torch.zeros_like(targets, dtype=torch.bool)
    T = targets.shape[1]
    for seq in sequences:
        n = len(seq)
        if n == 0 or n > T:
            continue
        starts = (targets.unfold(1, n, 1) == seq).all(dim=-1)  # [B, T - n + 1]: a tag starts here
        for offset in range(n):
            mask[:, offset:offset + T - n + 1] |= starts
    return mask


def tag_weights(labels, sequences, special_token_weight):
    """Per-position loss weights aligned with the shifted targets: 1 on labelled tokens, the special weight
    on labelled tag tokens, 0 elsewhere (prompt, template and padding never get weight)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    labelled = targets != -100
    weights = labelled.float()
    weights[labelled & tag_positions(targets, sequences)] = special_token_weight
    return targets, weights, labelled


def reason_loss(model, batch, sequences, special_token_weight):
    input_ids, labels = batch
    out = model(input_ids)
    targets, weights, labelled = tag_weights(labels, sequences, special_token_weight)
    token_loss = F.cross_entropy(out.logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    # normalised by the unweighted count, so the tags add loss rather than dilute the rest
    loss = (token_loss * weights).sum() / labelled.sum().clamp(min=1)
    return loss + out.aux_loss, {}


def tags_in_data(dataset, sequences, n=TAG_CHECK_SAMPLES):
    """The tags that occur in the labelled replies of the first n samples, or None when none of them keeps a
    labelled token (the window is too short: train() says so)."""
    found, labelled = set(), False
    for i in range(min(n, len(dataset))):
        labels = dataset[i][1][None]
        labelled = labelled or bool((labels != -100).any())
        for tag, seq in sequences.items():
            if tag not in found and tag_positions(labels, [seq.cpu()]).any():
                found.add(tag)
    return found if labelled else None


def main():
    parser = build_parser("MiniMind reasoning distillation", out_weight="reason", epochs=1, batch_size=8,
                          learning_rate=1e-6, max_seq_len=1024, data_path="dataset/r1_mix_1024.jsonl", from_weight="rlhf",
                          data_column="conversations")
    g = parser.add_argument_group("reasoning")
    g.add_argument("--special_token_weight", type=nonneg_float, default=10.0, help="loss weight of <think>/</think>/<answer>/</answer>")
    args = parser.parse_args()
    ctx = Context(args)
    tokenizer = load_tokenizer(args.tokenizer_path)
    dataset = SFTDataset(args.data_path, tokenizer, max_length=args.max_seq_len, skip_bad_lines=args.skip_bad_lines,
                         conversations_column=args.conversations_column)
    sequences = tag_sequences(tokenizer, ctx.device)
    found = tags_in_data(dataset, sequences)
    if found is not None and not found:
        as_ids = ", ".join(f"{tag} = {seq.tolist()}" for tag, seq in sequences.items())
        raise UserError(f"{args.data_path}: no reply in the first {TAG_CHECK_SAMPLES} samples contains a reasoning tag as "
                        f"{args.tokenizer_path} encodes it ({as_ids}); replies must look like <think>\\n...\\n</think>\\n"
                        f"<answer>\\n...\\n</answer> (or use train_full_sft.py)")
    if found and len(found) < len(TAGS):
        ctx.print(f"note: {', '.join(t for t in TAGS if t not in found)} not found in the first {TAG_CHECK_SAMPLES} replies")
    model = load_from_weight(args)

    loss_fn = functools.partial(reason_loss, sequences=list(sequences.values()), special_token_weight=args.special_token_weight)
    train(args, ctx, model, dataset, make_collate(tokenizer.pad_token_id), loss_fn, stage="reason")


if __name__ == "__main__":
    run_main(main)
