"""Stage 5, GRPO / CISPO: reinforcement learning from rewards, advantages relative to a group of replies.

    python train_grpo.py --data_path dataset/rlaif.jsonl --rewards format,answer
Loads out/reason_{dim}.pth (the policy, and a frozen copy as the KL reference), writes out/grpo_{dim}[_moe].pth.

Every optimizer step: the policy samples --num_generations (G) replies to each prompt; the rewards score
them; each reply's advantage is its reward relative to its group, (r - mean) / (std + eps), so no value
model is needed; the loss raises the log-probs of the tokens of better-than-average replies and lowers
those of worse ones, with a per-token KL penalty (--beta) that keeps the policy near the reference.
"""
import contextlib
import copy
import time

import torch

from dataset.lm_dataset import load_tokenizer
from trainer.rewards import Rewards, add_reward_args, reward_metrics, score_rollout
from trainer.rollout import (add_rollout_args, check_rollout_args, generate_rollout, load_prompts, reply_logps,
                             show_samples)
from trainer_utils import (Context, Logger, RunningMeans, SkippedSteps, UserError, after_step, build_parser, check_out_dir,
                           float_in, nonneg_float, positive_float,
                           count_steps, end_run, get_lr, load_from_weight, load_resume, make_loader, make_optimizer, new_run_state,
                           optimizer_step, run_main, set_lr, step_batches, wrap_ddp)


def group_advantages(rewards, group_size, eps=1e-4):
    """(r - mean of its group) / (std of its group + eps) for rewards [B * G], a group being G consecutive
    replies to one prompt. A group whose rewards are all equal teaches nothing: its advantages are exactly 0."""
    groups = rewards.view(-1, group_size)
    adv = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, unbiased=False, keepdim=True) + eps)
    no_signal = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    return torch.where(no_signal, torch.zeros_like(adv), adv).view(-1), no_signal.float().mean()


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, loss_type="grpo", epsilon=0.2, epsilon_high=5.0, beta=0.0):
    """Policy loss on reply tokens, averaged over all reply tokens of the batch (token-level).

    logps [N, R]: the policy's log-probs of the sampled tokens (with gradient); old_logps: the same when they
    were sampled; ref_logps: the reference's (None when beta is 0); advantages [N]; mask [N, R]: 1 on reply
    tokens (the end token included), 0 on padding after the reply.
      grpo:  -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon) * A)       (PPO's clipped objective)
      cispo: -sg(min(ratio, epsilon_high)) * A * logp   (the weight is clipped and not differentiated, so every
             token keeps a gradient, unlike PPO clipping, which zeroes it for clipped tokens)
    plus beta * k3, the per-token KL(policy || reference) estimate exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    if loss_type == "grpo":
        per_token = -torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
        clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    elif loss_type == "cispo":
        per_token = -ratio.clamp(max=epsilon_high).detach() * adv * logps
        clipped = ratio > epsilon_high
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    kl = torch.zeros_like(logps)
    if beta > 0:
        log_ref_ratio = ref_logps - logps
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        per_token = per_token + beta * kl
    n_tokens = mask.sum().clamp(min=1)
    loss = (per_token * mask).sum() / n_tokens
    metrics = {"kl": (kl.detach() * mask).sum() / n_tokens, "clip_frac": (clipped.float() * mask).sum() / n_tokens}
    return loss, metrics


def rollout_loss(model, reference, rollout, advantages, args):
    """grpo_loss of a rollout: the log-probs of its sampled tokens under the policy (with gradients) and the
    frozen reference (None: no KL term), plus the policy forward's MoE balancing loss."""
    logps, aux_loss = reply_logps(model, rollout, args.temperature)
    ref_logps = None
    if reference is not None:
        with torch.no_grad():
            ref_logps, _ = reply_logps(reference, rollout, args.temperature)
    loss, metrics = grpo_loss(logps, rollout.old_logps, ref_logps, advantages, rollout.reply_mask,
                              args.loss_type, args.epsilon, args.epsilon_high, args.beta)
    return loss + aux_loss, metrics


def add_grpo_args(parser, beta):
    g = parser.add_argument_group("GRPO")
    g.add_argument("--loss_type", default="cispo", choices=["grpo", "cispo"],
                   help="grpo: PPO-style clipped ratio (--epsilon); cispo: clipped, stop-gradient importance weight times "
                        "log-prob (--epsilon_high), MiniMind's default")
    g.add_argument("--epsilon", type=float_in(0, 1, lo_open=True, hi_open=True), default=0.2, help="grpo: the ratio is clipped to [1 - epsilon, 1 + epsilon]")
    g.add_argument("--epsilon_high", type=positive_float, default=5.0, help="cispo: upper bound of the importance weight")
    g.add_argument("--beta", type=nonneg_float, default=beta, help="weight of the per-token KL to the reference (0: no reference model)")
    return g


def main():
    parser = build_parser("MiniMind GRPO / CISPO: reinforcement learning from rewards", out_weight="grpo", epochs=1,
                          batch_size=8, learning_rate=1e-6, max_seq_len=512, data_path="dataset/rlaif.jsonl", data_column="conversations",
                          from_weight="reason", log_interval=1, save_interval=50, num_workers=0)
    add_rollout_args(parser, num_generations=8)
    add_reward_args(parser, rewards="format,answer")
    add_grpo_args(parser, beta=0.04)
    args = parser.parse_args()
    if args.num_generations < 2:
        raise UserError(f"--num_generations {args.num_generations}: GRPO compares replies within a group; use 2 or more")
    check_rollout_args(args)
    ctx = Context(args)
    check_out_dir(args.out_dir)

    # ---------------------------------------------------------------- models, rewards, data
    tokenizer = load_tokenizer(args.tokenizer_path)
    rewards = Rewards(args, ctx.device)
    dataset = load_prompts(args, tokenizer, rewards.need_gt)
    model = load_from_weight(args, finite=True).to(ctx.device)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if args.beta > 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args, ctx)
    loader, sampler = make_loader(dataset, args, ctx, collate_fn=list)
    steps_per_epoch, total_steps = count_steps(loader, args)
    state = new_run_state(args, ctx, total_steps, len(dataset), num_generations=args.num_generations)
    parts = {"model": model, "optimizer": optimizer}
    load_resume(args, ctx, state, parts, total_steps)
    ddp_model = wrap_ddp(model, ctx)
    logger, means, skips = Logger(args, ctx, "grpo", state), RunningMeans(), SkippedSteps(args.max_nonfinite)
    G = args.num_generations
    ctx.print(f"grpo: {len(dataset)} prompts, {ctx.world} process(es) x {args.batch_size} prompts x {G} replies per micro-batch, "
              f"{total_steps} optimizer steps, loss {args.loss_type}, rewards {args.rewards}, device {ctx.device}")

    # ---------------------------------------------------------------- the loop
    model.train()
    started, stopped_early = (time.time(), state["step"]), False

    def log_record():
        return {**means.read(ctx), "lr": lr}

    for batches in step_batches(loader, sampler, state, steps_per_epoch, total_steps, args):
        lr = get_lr(state["step"], total_steps, args.learning_rate, args.warmup_iters)
        set_lr(optimizer, lr)
        bad = torch.zeros((), device=ctx.device)
        for micro, (samples, _) in enumerate(batches):
            # 1. rollout: G replies per prompt, sampled by the current policy
            t0 = time.time()
            with ctx.autocast:
                rollout = generate_rollout(model, tokenizer, [s["prompt_ids"] for s in samples for _ in range(G)],
                                           args.max_new_tokens, args.temperature, args.top_p)
            rollout_s = time.time() - t0
            # 2. rewards -> group-relative advantages
            reward, reward_parts = score_rollout(rewards, samples, rollout, ctx.device)
            advantages, no_signal = group_advantages(reward, G)
            # 3. the loss on the policy's (and reference's) log-probs of the sampled tokens
            last = micro == len(batches) - 1
            with (ddp_model.no_sync() if ctx.ddp and not last else contextlib.nullcontext()), ctx.autocast:
                loss, metrics = rollout_loss(ddp_model, reference, rollout, advantages, args)
                bad = torch.maximum(bad, (~torch.isfinite(loss.detach())).float())
                ctx.scaler.scale(loss / len(batches)).backward()
            means.add({"loss": loss, **reward_metrics(reward, reward_parts), **metrics,
                       "reply_len": rollout.reply_mask.sum(dim=1).mean(), "no_signal": no_signal,
                       "rollout_share": rollout_s / max(time.time() - t0, 1e-9)})
        optimizer_step(ctx, state, [(optimizer, params)], args.grad_clip, skips, bad)
        state["step"] += 1
        show_samples(args, ctx, state["step"], rollout, reward, G)

        if after_step(args, ctx, state, total_steps, parts, logger, log_record, started, skips):
            stopped_early = True
            break
    end_run(args, ctx, state, total_steps, parts, logger, stopped_early, skips)


if __name__ == "__main__":
    run_main(main)
