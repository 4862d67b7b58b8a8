"""Stage 3, DPO (direct preference optimisation): prefer the chosen reply over the rejected one.

    python train_dpo.py --data_path dataset/dpo.jsonl
The policy and a frozen reference both start from out/full_sft_{dim}.pth; writes out/rlhf_{dim}[_moe].pth.
"""
import copy
import functools

import torch
import torch.nn.functional as F

from dataset.lm_dataset import DPODataset, load_tokenizer, make_collate
from trainer_utils import Context, build_parser, load_from_weight, positive_float, run_main, train


def sequence_logprobs(model, input_ids, labels, reduction="mean"):
    """log p(reply | prompt) per sequence, over the labelled (assistant) tokens; mean or sum over them."""
    out = model(input_ids)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    token_logp = -F.cross_entropy(out.logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    mask = (targets != -100).float()
    logp = (token_logp * mask).sum(dim=1)
    if reduction == "mean":
        logp = logp / mask.sum(dim=1).clamp(min=1)
    return logp, out.aux_loss


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """-log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))), averaged over the batch."""
    logits = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    return -F.logsigmoid(beta * logits).mean()


def dpo_batch_loss(model, batch, reference, beta, reduction):
    # chosen and rejected go through one forward pass as one batch
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    n = batch["chosen_input_ids"].shape[0]
    with torch.no_grad():
        ref_logp, _ = sequence_logprobs(reference, ids, labels, reduction)
    pi_logp, aux_loss = sequence_logprobs(model, ids, labels, reduction)
    loss = dpo_loss(pi_logp[:n], pi_logp[n:], ref_logp[:n], ref_logp[n:], beta)
    chosen_reward = beta * (pi_logp[:n] - ref_logp[:n]).detach()
    rejected_reward = beta * (pi_logp[n:] - ref_logp[n:]).detach()
    metrics = {"reward_acc": (chosen_reward > rejected_reward).float().mean(),
               "margin": (chosen_reward - rejected_reward).mean()}
    return loss + aux_loss, metrics


def main():
    parser = build_parser("MiniMind DPO", out_weight="rlhf", epochs=2, batch_size=8, learning_rate=1e-8,
                          max_seq_len=1024, data_path="dataset/dpo.jsonl", from_weight="full_sft")
    g = parser.add_argument_group("DPO")
    g.add_argument("--beta", type=positive_float, default=0.1, help="strength of the KL anchor to the reference")
    g.add_argument("--logp_reduction", default="mean", choices=["mean", "sum"],
                   help="sequence log-prob: mean (MiniMind) or sum (the DPO paper) over reply tokens")
    args = parser.parse_args()
    ctx = Context(args)
    tokenizer = load_tokenizer(args.tokenizer_path)
    dataset = DPODataset(args.data_path, tokenizer, max_length=args.max_seq_len, skip_bad_lines=args.skip_bad_lines)
    model = load_from_weight(args)
    reference = copy.deepcopy(model).to(ctx.device).eval().requires_grad_(False)  # frozen copy of the start

    loss_fn = functools.partial(dpo_batch_loss, reference=reference, beta=args.beta, reduction=args.logp_reduction)
    train(args, ctx, model, dataset, make_collate(tokenizer.pad_token_id), loss_fn, stage="dpo")


if __name__ == "__main__":
    run_main(main)
