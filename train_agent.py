"""Agent RL: GRPO / CISPO over multi-turn episodes in which the model calls tools (MiniMind-3's train_agent.py).

    python train_agent.py --data_path dataset/agent_rl.jsonl
Loads out/full_sft_{dim}.pth (the policy, and a frozen copy as the KL reference), writes out/agent_{dim}[_moe].pth.

Every optimizer step: for each prompt the policy plays --num_generations (G) episodes. In an episode it
replies; the tool calls in its reply are run (trainer/tools.py: calculator, units, dates) and their results
fed back as the chat template renders them, up to --max_turns replies, until it answers without a call
(trainer/agent.py). The rewards score each episode: mainly whether its final answer holds the data's "gt"
values, whether its calls ran, and its format. Advantages are relative to the prompt's group, as in GRPO
(train_grpo.py, whose loss this is); the loss covers only tokens the policy sampled, never the tool results.
"""
import contextlib
import copy
import time

import torch

from dataset.lm_dataset import AgentPromptDataset, chat_messages, line_tools, load_tokenizer
from trainer.agent import EPISODE_REWARDS, agent_rollout
from trainer.rewards import Rewards, add_reward_args, reward_metrics
from trainer.rollout import add_rollout_args, check_rollout_args, load_prompts, show_samples
from trainer.tools import ToolError, select_tools
from trainer_utils import (Context, Logger, RunningMeans, SkippedSteps, UserError, after_step, build_parser, check_out_dir,
                           positive_float, positive_int,
                           count_steps, end_run, get_lr, load_from_weight, load_resume, make_loader, make_optimizer, new_run_state,
                           optimizer_step, run_main, set_lr, step_batches, wrap_ddp)
from train_grpo import add_grpo_args, group_advantages, rollout_loss

AGENT_REWARDS_HELP = ("comma-separated rewards to add up, each scored on a whole episode: answer (the share of the data's "
                      "\"gt\" values the final answer holds, numbers compared as numbers), tools (the share of the "
                      "episode's calls that ran; with no call, 1 when the line's gt is [] and 0 otherwise), format (a final answer, tags that pair up, calls that are JSON with a "
                      "name), repetition (repeated 3-grams in the final answer), length (--length_min..--length_max "
                      "characters of the final answer), model (--reward_model_path, on the final answer)")


def offered_tools(dataset):
    """How many prompts offer each tool name, and how many offer none."""
    counts, without = {}, 0
    for i in range(len(dataset)):
        rec = dataset.record(i)
        _, offered = chat_messages(rec["conversations"], "conversations", line_tools(rec), rl_prompt=True)
        without += not offered
        for t in offered or []:
            name = t.get("function", t)["name"]
            counts[name] = counts.get(name, 0) + 1
    return counts, without


def main():
    parser = build_parser("MiniMind agent RL: GRPO / CISPO over episodes that call tools", out_weight="agent", epochs=1,
                          batch_size=2, learning_rate=1e-6, max_seq_len=1024, data_path="dataset/agent_rl.jsonl",
                          data_column="conversations", from_weight="full_sft", log_interval=1, save_interval=10, num_workers=0)
    add_rollout_args(parser, num_generations=4)
    add_reward_args(parser, rewards="answer,tools,format", rewards_help=AGENT_REWARDS_HELP)
    g = parser.add_argument_group("episodes")
    g.add_argument("--tools", default="all", metavar="calculator,units,dates|all",
                   help="the tools the environment runs (trainer/tools.py); a prompt's calls may use those its data offers, "
                        "any other call is answered with an error text")
    g.add_argument("--max_turns", type=positive_int, default=3,
                   help="the most replies per episode; an episode still calling tools after them has no final answer")
    g.add_argument("--max_total_len", type=positive_int, default=2500,
                   help="the most tokens of an episode (prompt, replies, tool results); one that would pass it stops "
                        "without a final answer")
    g.add_argument("--tool_timeout", type=positive_float, default=5.0, help="seconds a tool call may take")
    add_grpo_args(parser, beta=0.1)  # MiniMind-3's agent default
    args = parser.parse_args()
    if args.num_generations < 2:
        raise UserError(f"--num_generations {args.num_generations}: GRPO compares episodes within a group; use 2 or more")
    if args.max_total_len < args.max_seq_len + args.max_new_tokens:
        raise UserError(f"--max_total_len {args.max_total_len} must be at least --max_seq_len {args.max_seq_len} (the "
                        f"longest prompt) + --max_new_tokens {args.max_new_tokens} (one reply)")
    check_rollout_args(args)
    try:
        tools = select_tools(args.tools)
    except ToolError as e:
        raise UserError(f"--tools: {e}") from None
    ctx = Context(args)
    check_out_dir(args.out_dir)

    # ---------------------------------------------------------------- models, rewards, data
    tokenizer = load_tokenizer(args.tokenizer_path)
    rewards = Rewards(args, ctx.device, functions=EPISODE_REWARDS)
    dataset = load_prompts(args, tokenizer, dataset=AgentPromptDataset)
    offered, without = offered_tools(dataset)
    missing = sorted(((name, n) for name, n in offered.items() if name not in tools), key=lambda kv: -kv[1])
    if missing:
        ctx.print("warning: the data offers tools that --tools does not run (their calls get an error text): "
                  + ", ".join(f"{name} ({n} prompts)" for name, n in missing))
    if without == len(dataset):
        ctx.print(f"warning: none of the {without} prompts offers tools (\"tools\" on the system message or the line), so "
                  f"every call gets an error text: is --data_path agent RL data?")
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
    logger, means, skips = Logger(args, ctx, "agent", state), RunningMeans(), SkippedSteps(args.max_nonfinite)
    G = args.num_generations
    ctx.print(f"agent: {len(dataset)} prompts, {ctx.world} process(es) x {args.batch_size} prompts x {G} episodes per "
              f"micro-batch, up to {args.max_turns} replies each, tools {', '.join(tools)}, {total_steps} optimizer steps, "
              f"loss {args.loss_type}, rewards {args.rewards}, device {ctx.device}")

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
            # 1. episodes: G per prompt, the policy replying and the tools answering its calls
            t0 = time.time()
            with ctx.autocast:
                rollout, episodes = agent_rollout(model, tokenizer, samples, G, tools, args.max_turns, args.max_new_tokens,
                                                  args.max_total_len, args.temperature, args.top_p, args.tool_timeout)
            rollout_s = time.time() - t0
            # 2. rewards of whole episodes -> group-relative advantages
            reward, reward_parts = rewards(episodes, ctx.device)
            advantages, no_signal = group_advantages(reward, G)
            # 3. GRPO's loss on the policy's own tokens (reply_mask is 0 on tool results and the template's glue)
            last = micro == len(batches) - 1
            with (ddp_model.no_sync() if ctx.ddp and not last else contextlib.nullcontext()), ctx.autocast:
                loss, metrics = rollout_loss(ddp_model, reference, rollout, advantages, args)
                bad = torch.maximum(bad, (~torch.isfinite(loss.detach())).float())
                ctx.scaler.scale(loss / len(batches)).backward()
            per_episode = lambda f: sum(f(e) for e in episodes) / len(episodes)  # noqa: E731
            means.add({"loss": loss, **reward_metrics(reward, reward_parts), **metrics,
                       "reply_len": rollout.reply_mask.sum(dim=1).mean(), "no_signal": no_signal,
                       "turns": per_episode(lambda e: len(e.turns)), "calls": per_episode(lambda e: len(e.calls)),
                       "calls_ran": per_episode(lambda e: sum(not r.startswith("error:") for _, r in e.calls)),
                       "answered": per_episode(lambda e: e.finished),
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
