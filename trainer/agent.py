"""Agent RL (train_agent.py): episodes in which the policy calls tools, reads their results and answers.

    rollout, episodes = agent_rollout(model, tokenizer, samples, group_size, tools, max_turns=3, ...)

An episode is one prompt answered over up to `max_turns` model turns: each turn the policy samples a reply
(batched across all unfinished episodes, with the KV cache, by trainer/rollout.generate_rollout); a reply
with <tool_call> blocks has them run by the tool runner (trainer/tools.py) and the results appended as the
chat template renders them (the <tool_response> turn and the next generation prompt), then the policy goes
on. A reply without calls is the final answer. The whole episode becomes one row of a `Rollout`: the prompt,
then every token after it, with `reply_mask` 1 on the tokens the policy sampled (its end tokens included) and
0 on what the environment wrote, so the GRPO loss and the KL see only the policy's own tokens.
"""
import unicodedata
from dataclasses import dataclass, field

import torch

from dataset.lm_dataset import encode_plain, render_chat
from trainer.chat import assistant_message, run_calls
from trainer.rewards import NUMBER, normalize_text, parse_number, repetition_reward
from trainer.rollout import Rollout, generate_rollout, left_pad
from trainer_utils import UserError


@dataclass
class Episode:
    """What the rewards see. text: the final answer (the last turn's content, without its think part); ""
    when the episode did not finish (a turn cut off at --max_new_tokens, out of turns or out of length).
    calls: (tool name, the text the runner answered) for every call, in order. turns: each turn's text."""
    messages: list                              # the prompt (what a reward model is shown with the final answer)
    gt: list
    schemas: list                               # the tools the prompt offers (rendered into its system turn)
    tools: dict                                 # those of them the runner can run: {name: Tool}
    prefix: str                                 # what the generation prompt pre-fills (e.g. "<think>\n")
    template_kwargs: dict
    ids: list                                   # prompt + everything after it
    mask: list = field(default_factory=list)    # per token after the prompt: 1 sampled by the policy, 0 not
    logps: list = field(default_factory=list)   # the sampling log-prob of each policy token (0 elsewhere)
    turns: list = field(default_factory=list)
    calls: list = field(default_factory=list)
    conversation: list = field(default_factory=list)  # the prompt, then each reply that called tools and the results
    text: str = ""
    stop: str = ""                              # why it ended: answer, cut, turns, length ("": it goes on)

    @property
    def finished(self):
        """It ended with a final answer (a reply without calls)."""
        return self.stop == "answer"


# ----------------------------------------------------------------------------------------------------
# rewards of an episode (answer, tools, format: 0..1; combined by --rewards / --reward_weights with repetition,
# length and model, which score the final answer as they score a reply in train_grpo.py)
def holds(text, value):
    """The text states value: a number as one of its numbers (42 = 42.0 = ４２), other values as normalized text."""
    want = parse_number(value)
    if want is not None:
        return any(parse_number(n) == want for n in NUMBER.findall(unicodedata.normalize("NFKC", text)))
    return normalize_text(value) in normalize_text(text)


def answer_reward(episode):
    """The share of the ground-truth values the final answer holds (0 without a final answer or a gt)."""
    if not episode.finished or not episode.gt:
        return 0.0
    return sum(holds(episode.text, g) for g in episode.gt) / len(episode.gt)


def tools_reward(episode):
    """The share of the episode's tool calls that ran (a well-formed call of an offered tool with arguments
    its schema accepts). An episode that called nothing: 1 if its line has no gt (a question no tool is needed
    for, as in MiniMind-3's data), else 0."""
    if not episode.calls:
        return 0.0 if episode.gt else 1.0
    return sum(not result.startswith("error:") for _, result in episode.calls) / len(episode.calls)


def format_reward(episode):
    """1 if the episode ended with a final answer and every turn's tags pair up (<tool_call> with </tool_call>,
    at most one think block) and every call block is a JSON call with a name; else 0."""
    ok = episode.finished and all(
        t.count("<tool_call>") == t.count("</tool_call>") and t.count("<think>") == t.count("</think>") <= 1
        for t in episode.turns) and all(name for name, _ in episode.calls)
    return 1.0 if ok else 0.0


EPISODE_REWARDS = {"answer": answer_reward, "tools": tools_reward, "format": format_reward, "repetition": repetition_reward}


# ----------------------------------------------------------------------------------------------------
# the rollout
def observation_ids(tokenizer, episode, reply, results):
    """The tokens the environment adds after a reply that called tools (the reply's end token is already
    there): the tool-results turn and the next generation prompt, exactly as the chat template renders them."""
    before = render_chat(tokenizer, episode.conversation + [reply], episode.schemas)
    after = render_chat(tokenizer, episode.conversation + [reply] + results, episode.schemas, add_generation_prompt=True,
                        **episode.template_kwargs)
    end = before.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)
    if not after.startswith(before[:end]):
        raise UserError("the tokenizer's chat template renders earlier turns differently once tool results follow, "
                        "so an episode's tokens would not be what it sampled; agent RL needs a template that only "
                        "appends (the shipped one does): check --tokenizer_path")
    return encode_plain(tokenizer, after[end:])


@torch.no_grad()
def agent_rollout(model, tokenizer, samples, group_size, tools, max_turns, max_new_tokens, max_total_len,
                  temperature=1.0, top_p=1.0, timeout=5.0, generator=None):
    """group_size episodes for each sample (an AgentPromptDataset item). tools: {name: Tool} the environment can
    run; a prompt's calls may use those of them its data offers. -> (Rollout, [Episode])."""
    episodes = []
    for s in samples:
        offered = {t.get("function", t)["name"] for t in (s["tools"] or [])}
        runnable = {name: tool for name, tool in tools.items() if name in offered}
        for _ in range(group_size):
            episodes.append(Episode(messages=s["messages"], gt=s["gt"], schemas=s["tools"], tools=runnable,
                                    prefix=s["reply_prefix"], template_kwargs=s["template_kwargs"], ids=list(s["prompt_ids"]),
                                    conversation=list(s["messages"])))
    prompt_lens = [len(e.ids) for e in episodes]
    for turn in range(max_turns):
        alive = [e for e in episodes if not e.stop]
        if not alive:
            break
        r = generate_rollout(model, tokenizer, [e.ids for e in alive], max_new_tokens, temperature, top_p, generator)
        for row, e in enumerate(alive):
            n = int(r.reply_mask[row].sum())
            e.ids += r.reply_ids[row, :n].tolist()
            e.mask += [1] * n
            e.logps += r.old_logps[row, :n].tolist()
            text = e.prefix + r.texts[row]
            e.turns.append(text)
            reply = assistant_message(text)
            if not r.finished[row]:
                e.stop = "cut"
                continue
            if "tool_calls" not in reply:
                e.stop, e.text = "answer", reply["content"]
                continue
            results = run_calls(reply, e.tools, timeout)
            e.calls += [(call["function"]["name"], res["content"]) for call, res in zip(reply["tool_calls"], results)]
            if turn == max_turns - 1:
                e.stop = "turns"
                continue
            obs = observation_ids(tokenizer, e, reply, results)
            if len(e.ids) + len(obs) + max_new_tokens > max_total_len:
                e.stop = "length"
                continue
            e.conversation += [reply] + results
            e.ids += obs
            e.mask += [0] * len(obs)
            e.logps += [0.0] * len(obs)
    return assemble(episodes, prompt_lens, tokenizer, next(model.parameters()).device), episodes


def assemble(episodes, prompt_lens, tokenizer, device):
    """Episodes -> one Rollout: prompts left-padded to a common length P, what follows right-padded to R."""
    prompts = [e.ids[:p] for e, p in zip(episodes, prompt_lens)]
    ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id, device)
    R = max(len(e.mask) for e in episodes)
    after = torch.full((len(episodes), R), tokenizer.pad_token_id, dtype=torch.long)
    real = torch.zeros((len(episodes), R), dtype=torch.long)
    policy = torch.zeros((len(episodes), R))
    logps = torch.zeros((len(episodes), R))
    for row, (e, p) in enumerate(zip(episodes, prompt_lens)):
        n = len(e.mask)
        after[row, :n] = torch.tensor(e.ids[p:], dtype=torch.long)
        real[row, :n] = 1
        policy[row, :n] = torch.tensor(e.mask, dtype=torch.float32)
        logps[row, :n] = torch.tensor(e.logps, dtype=torch.float32)
    return Rollout(input_ids=torch.cat([ids, after.to(device)], dim=1),
                   attention_mask=torch.cat([prompt_mask, real.to(device)], dim=1),
                   reply_mask=policy.to(device), old_logps=logps.to(device), prompt_len=ids.shape[1],
                   texts=[" ⏎ ".join(e.turns) for e in episodes], finished=[e.finished for e in episodes])
