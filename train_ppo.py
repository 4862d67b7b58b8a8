"""Stage 5 (alternative), PPO: reinforcement learning from rewards with a learned critic.

    python train_ppo.py --data_path dataset/rlaif.jsonl --rewards format,answer
Loads out/reason_{dim}.pth (the policy; a frozen copy is the KL reference; the critic starts from the same
weights with a new value head), writes out/ppo_{dim}[_moe].pth. The resume file also holds the critic.

Every step: the policy answers a batch of prompts; each reply token gets a reward (-kl_coef * its KL to the
reference, plus the reply's score on its last token); the critic estimates the value of every prefix, and
GAE turns rewards and values into per-token advantages. Then --ppo_epochs passes over the batch in
mini-batches train the policy with the clipped surrogate and the critic with a clipped value loss,
stopping early when the policy has moved too far from the one that sampled (approximate KL > --target_kl).
"""
import copy
import time

import torch
from torch import nn

from dataset.lm_dataset import load_tokenizer
from trainer.rewards import Rewards, add_reward_args, reward_metrics, score_rollout
from trainer.rollout import (add_rollout_args, check_rollout_args, generate_rollout, load_prompts, reply_logps,
                             show_samples)
from trainer_utils import (Context, Logger, RunningMeans, SkippedSteps, UserError, after_step, build_parser, check_out_dir,
                           add_bool, float_in, nonneg_float, positive_float, positive_int,
                           count_steps, end_run, get_lr, load_from_weight, load_resume, make_loader, make_optimizer, new_run_state,
                           optimizer_step, run_main, set_lr, step_batches, unwrap, wrap_ddp)


class ValueModel(nn.Module):
    """The critic: its own copy of the policy's Transformer body, and a linear value head on every position
    (zero at the start, so the first values are 0)."""

    def __init__(self, policy):
        super().__init__()
        self.model = copy.deepcopy(unwrap(policy).model)
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask=None):
        hidden, _, aux_loss = self.model(input_ids, attention_mask)
        return self.value_head(hidden).squeeze(-1).float(), aux_loss


def reply_values(critic, rollout):
    """V(prefix before each reply token) [N, R]: the critic's output at the position that predicts that token."""
    values, aux_loss = critic(rollout.input_ids, rollout.attention_mask)
    R = rollout.reply_mask.shape[1]
    return values[:, -R - 1:-1], aux_loss


def token_rewards(scores, logps, ref_logps, mask, kl_coef):
    """Per-token rewards [N, R]: -kl_coef * (logp - ref_logp) on every reply token, plus the reply's score on
    its last token (the end token, or the last one sampled when the reply was cut off)."""
    rewards = -kl_coef * (logps - ref_logps) * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over each reply (mask [N, R]: 1 on its tokens, a prefix of each row).
    delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 after the last token; A_t = delta_t + gamma * lam * A_{t+1}.
    Returns advantages and returns (= advantages + values, the critic's targets), 0 outside the reply."""
    N, R = rewards.shape
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(N, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(R)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < R else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked entries; 0 elsewhere."""
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def ppo_losses(logps, old_logps, advantages, values, old_values, returns, mask, epsilon, value_clip):
    """Token-level means over reply tokens of the clipped policy loss -min(ratio * A, clip(ratio) * A), the
    clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2), and the approximate KL of the new policy to
    the one that sampled, mean((ratio - 1) - log ratio) (>= 0)."""
    n = mask.sum().clamp(min=1)
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    policy_loss = (-torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages) * mask).sum() / n
    values_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    value_loss = 0.5 * (torch.max((values - returns) ** 2, (values_clipped - returns) ** 2) * mask).sum() / n
    approx_kl = (((ratio - 1) - log_ratio).detach() * mask).sum() / n
    clipped = ((ratio - 1).abs() > epsilon).float()
    return policy_loss, value_loss, approx_kl, {"clip_frac": (clipped * mask).sum() / n}


def main():
    parser = build_parser("MiniMind PPO: reinforcement learning from rewards with a critic. A step (--max_steps, "
                          "--log_interval, --save_interval) is one rollout batch of --batch_size prompts and its passes.",
                          out_weight="ppo", epochs=1,
                          batch_size=8, learning_rate=1e-6, max_seq_len=512, data_path="dataset/rlaif.jsonl", data_column="conversations",
                          from_weight="reason", log_interval=1, save_interval=50, num_workers=0)
    add_rollout_args(parser, num_generations=1)
    add_reward_args(parser, rewards="format,answer")
    g = parser.add_argument_group("PPO")
    g.add_argument("--ppo_epochs", "--ppo_update_iters", dest="ppo_epochs", type=positive_int, default=2,
                   help="passes over each rollout batch")
    g.add_argument("--mini_batch_size", type=positive_int, default=4, help="replies per policy/critic update within a pass")
    g.add_argument("--epsilon", "--clip_epsilon", dest="epsilon", type=float_in(0, 1, lo_open=True, hi_open=True), default=0.2,
                   help="the policy ratio is clipped to [1 - epsilon, 1 + epsilon]")
    g.add_argument("--value_clip", "--cliprange_value", dest="value_clip", type=positive_float, default=0.2,
                   help="a new value may move at most this far from the rollout's value before its loss stops counting")
    g.add_argument("--vf_coef", type=nonneg_float, default=0.5, help="weight of the value loss")
    g.add_argument("--kl_coef", type=nonneg_float, default=0.02, help="per-token reward -kl_coef * (logp - ref_logp)")
    g.add_argument("--gamma", type=float_in(0, 1), default=1.0, help="GAE discount")
    g.add_argument("--lam", type=float_in(0, 1), default=0.95, help="GAE lambda (1: Monte Carlo returns, 0: one-step TD)")
    g.add_argument("--target_kl", "--early_stop_kl", dest="target_kl", type=nonneg_float, default=0.1,
                   help="stop the passes over a batch when the approximate KL to the sampling policy exceeds this (0: never)")
    add_bool(g, "--debug_log_ratio", help="print |log(new/old)| of each step's first mini-batch: before any update it "
                                          "should be ~0 (the rollout's log-probs are the policy's)")
    g.add_argument("--critic_learning_rate", type=positive_float, default=5e-6, help="peak LR of the critic (same schedule)")
    args = parser.parse_args()
    n_replies = args.batch_size * args.num_generations
    if args.accumulation_steps != 1:
        raise UserError("train_ppo.py: --accumulation_steps must be 1; a step is one rollout batch of --batch_size x "
                        "--num_generations replies, updated in --mini_batch_size pieces")
    if not 1 <= args.mini_batch_size <= n_replies or args.ppo_epochs < 1 or args.num_generations < 1:
        raise UserError(f"--mini_batch_size must be in 1..{n_replies} (--batch_size x --num_generations), "
                        f"--ppo_epochs and --num_generations at least 1")
    check_rollout_args(args)
    ctx = Context(args)
    check_out_dir(args.out_dir)

    # ---------------------------------------------------------------- models, rewards, data
    tokenizer = load_tokenizer(args.tokenizer_path)
    rewards = Rewards(args, ctx.device)
    dataset = load_prompts(args, tokenizer, rewards.need_gt)
    model = load_from_weight(args, finite=True).to(ctx.device)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    critic = ValueModel(model).to(ctx.device)
    params, critic_params = list(model.parameters()), list(critic.parameters())
    optimizer = make_optimizer(params, args, ctx)
    critic_optimizer = make_optimizer(critic_params, args, ctx)
    loader, sampler = make_loader(dataset, args, ctx, collate_fn=list)
    steps_per_epoch, total_steps = count_steps(loader, args)
    state = new_run_state(args, ctx, total_steps, len(dataset), num_generations=args.num_generations,
                          mini_batch_size=args.mini_batch_size, ppo_epochs=args.ppo_epochs)
    parts = {"model": model, "optimizer": optimizer, "critic": critic, "critic_optimizer": critic_optimizer}
    load_resume(args, ctx, state, parts, total_steps)
    ddp_model, ddp_critic = wrap_ddp(model, ctx), wrap_ddp(critic, ctx)
    logger, means, skips = Logger(args, ctx, "ppo", state), RunningMeans(), SkippedSteps(args.max_nonfinite)
    G = args.num_generations
    ctx.print(f"ppo: {len(dataset)} prompts, {ctx.world} process(es) x {n_replies} replies per step, {args.ppo_epochs} passes "
              f"in mini-batches of {args.mini_batch_size}, {total_steps} steps, rewards {args.rewards}, device {ctx.device}")

    # ---------------------------------------------------------------- the loop: one rollout batch per step
    model.train()
    critic.train()
    started, stopped_early = (time.time(), state["step"]), False

    def log_record():
        return {**means.read(ctx), "lr": lr}

    for [(samples, _)] in step_batches(loader, sampler, state, steps_per_epoch, total_steps, args):  # one batch a step
        lr = get_lr(state["step"], total_steps, args.learning_rate, args.warmup_iters)
        set_lr(optimizer, lr)
        set_lr(critic_optimizer, get_lr(state["step"], total_steps, args.critic_learning_rate, args.warmup_iters))
        # 1. rollout, rewards, the reference's log-probs and the critic's values
        with ctx.autocast:
            rollout = generate_rollout(model, tokenizer, [s["prompt_ids"] for s in samples for _ in range(G)],
                                       args.max_new_tokens, args.temperature, args.top_p)
            with torch.no_grad():
                ref_logps, _ = reply_logps(reference, rollout, args.temperature)
                old_values, _ = reply_values(critic, rollout)
        scores, score_parts = score_rollout(rewards, samples, rollout, ctx.device)
        mask, old_logps = rollout.reply_mask, rollout.old_logps
        # 2. per-token rewards -> GAE advantages and value targets
        rewards_t = token_rewards(scores, old_logps, ref_logps, mask, args.kl_coef)
        advantages, returns = gae(rewards_t, old_values.float() * mask, mask, args.gamma, args.lam)
        advantages = whiten(advantages, mask)
        # 3. --ppo_epochs passes in mini-batches, stopping when the policy has moved too far
        updates, early_stop = 0, False
        for _ in range(args.ppo_epochs):
            order = torch.randperm(n_replies, device=ctx.device)
            for mb in order.split(args.mini_batch_size):
                sub = rollout.rows(mb)
                with ctx.autocast:
                    logps, aux_loss = reply_logps(ddp_model, sub, args.temperature)
                    values, critic_aux = reply_values(ddp_critic, sub)
                    policy_loss, value_loss, approx_kl, metrics = ppo_losses(
                        logps, old_logps[mb], advantages[mb], values, old_values[mb], returns[mb], mask[mb],
                        args.epsilon, args.value_clip)
                if args.debug_log_ratio and updates == 0:  # before any update: the stored log-probs must be the policy's
                    log_ratio = ((logps.detach().float() - old_logps[mb]) * mask[mb]).abs()
                    ctx.print(f"    step {state['step'] + 1} first mini-batch |log ratio|: mean "
                              f"{log_ratio.sum().item() / mask[mb].sum().clamp(min=1).item():.2e}, max {log_ratio.max().item():.2e}")
                # every rank takes the same decision, so DDP's collective calls stay matched
                if args.target_kl > 0 and ctx.all_reduce_mean(approx_kl.clone()).item() > args.target_kl:
                    early_stop = True
                    break
                loss = policy_loss + args.vf_coef * value_loss + aux_loss + critic_aux
                bad = (~torch.isfinite(loss.detach())).float()
                ctx.scaler.scale(loss).backward()
                optimizer_step(ctx, state, [(optimizer, params), (critic_optimizer, critic_params)], args.grad_clip, skips, bad)
                updates += 1
                means.add({"policy_loss": policy_loss, "value_loss": value_loss, "approx_kl": approx_kl, **metrics})
            if early_stop:
                break
        means.add({**reward_metrics(scores, score_parts),
                   "kl": ((old_logps - ref_logps) * mask).sum() / mask.sum().clamp(min=1),
                   "reply_len": mask.sum(dim=1).mean(), "updates": updates, "early_stop": float(early_stop)})
        state["step"] += 1
        show_samples(args, ctx, state["step"], rollout, scores, G)

        if after_step(args, ctx, state, total_steps, parts, logger, log_record, started, skips):
            stopped_early = True
            break
    end_run(args, ctx, state, total_steps, parts, logger, stopped_early, skips)


if __name__ == "__main__":
    run_main(main)
