"""Held-out evaluation for the demo: one metric per stage that shows the stage did its job.

Every number comes from running the models on the held-out *_eval.jsonl files at run time.
"""
import json
import math
import re

import torch
import torch.nn.functional as F
from transformers import LogitsProcessorList

from dataset.lm_dataset import PretrainDataset, SFTDataset, chat_messages, make_collate, render_chat
from trainer.tool_guide import ToolCallGuide
from trainer.tools import TOOLS, parse_tool_calls, run_tool_call

REASON_TEMPLATE = re.compile(r"^<think>\n(.+?)\n</think>\n<answer>\n(.+?)\n</answer>$", re.S)
THINK_OFF_TEMPLATE = re.compile(r"^<think>\n()\n</think>\n<answer>\n((?:(?!<think>).)+?)\n</answer>$", re.S)  # empty think block


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def mean_loss(model, dataset, device, batch_size=16):
    """Token-weighted mean next-token loss over a dataset's labelled tokens."""
    model.eval()
    collate = make_collate(0)
    total, count = 0.0, 0
    for i in range(0, len(dataset), batch_size):
        ids, labels = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
        ids, labels = ids.to(device), labels.to(device)
        logits = model(ids).logits
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        loss = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((targets != -100).sum())
    return total / max(count, 1)


def pretrain_metrics(model, tokenizer, eval_path, max_len, device):
    loss = mean_loss(model, PretrainDataset(eval_path, tokenizer, max_length=max_len), device)
    return {"loss": loss, "ppl": math.exp(min(loss, 50))}


def copy_probe(tokenizer, eval_path, n=64, lengths=(8, 32), seed=0):
    """In-context copying (what an induction head does): n rows, each of held-out prose tokens drawn at random:
    a filler, then `length` distinct tokens, then the same tokens again, with `length` drawn per row from
    `lengths` and the filler making every row equally long. The repeat's distance changes from row to row, so
    a head that attends a fixed number of tokens back (which copy drills of one length teach) scores little;
    only matching the context does. A model that cannot continue the repeat cannot put a tool's result into
    its answer or a problem's numbers into its working. Returns (tokens, mask of the positions to score)."""
    pool = torch.tensor(sorted({t for row in read_jsonl(eval_path) for t in tokenizer.encode(row["text"])}
                               - set(tokenizer.all_special_ids)))
    g = torch.Generator().manual_seed(seed)
    lo, hi = lengths
    width = 2 * hi + 8
    rows, masks = [], []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        draw = pool[torch.randperm(len(pool), generator=g)[:width - length]]  # filler and sequence, all distinct
        x = draw[width - 2 * length:]
        rows.append(torch.cat([draw[:width - 2 * length], x, x]))
        mask = torch.zeros(width, dtype=torch.bool)
        mask[width - length + 1:] = True  # the repeat's tokens after its first: predictable only by copying
        masks.append(mask)
    return torch.stack(rows), torch.stack(masks)


@torch.no_grad()
def copy_accuracy(model, probe, device):
    """The share of the repeat's tokens (after its first) that the model predicts right on a copy_probe()."""
    model.eval()
    tokens, mask = (t.to(device) for t in probe)
    pred = model(tokens).logits.argmax(-1)
    return (pred[:, :-1] == tokens[:, 1:])[mask[:, 1:]].float().mean().item()


def sft_loss(model, tokenizer, eval_path, max_len, device):
    return mean_loss(model, SFTDataset(eval_path, tokenizer, max_length=max_len), device)


@torch.no_grad()
def generate_replies(model, tokenizer, prompts, device, max_new_tokens=96, batch_size=32, tools=None, guided=False,
                     **template_kwargs):
    """Greedy replies to chat prompts (lists of messages; tools[i]: prompt i's tool schemas or None; template_kwargs
    such as enable_thinking go to the chat template). guided: tool calls kept well-formed by a ToolCallGuide,
    as eval_model.py and the server do by default (a batch's prompts must then offer the same tools).
    Returns (text, closed_by_eos) per prompt."""
    model.eval()
    results = []
    tools = tools or [None] * len(prompts)
    for i in range(0, len(prompts), batch_size):
        chunk, chunk_tools = prompts[i:i + batch_size], tools[i:i + batch_size]
        texts = [render_chat(tokenizer, m, t, add_generation_prompt=True, **template_kwargs)
                 for m, t in zip(chunk, chunk_tools)]
        enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(e) for e in enc)
        ids = torch.zeros(len(enc), width, dtype=torch.long)
        mask = torch.zeros(len(enc), width, dtype=torch.long)
        for r, e in enumerate(enc):  # left padding, so every row continues at the right edge
            ids[r, width - len(e):] = torch.tensor(e)
            mask[r, width - len(e):] = 1
        processors = LogitsProcessorList()
        if guided and chunk_tools[0]:
            if any(t != chunk_tools[0] for t in chunk_tools):
                raise ValueError("guided generation needs the same tools for every prompt of a batch")
            processors.append(ToolCallGuide(tokenizer, chunk_tools[0], width))
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             logits_processor=processors)
        for row in out[:, width:].tolist():
            closed = tokenizer.eos_token_id in row
            row = row[:row.index(tokenizer.eos_token_id)] if closed else row
            results.append((tokenizer.decode(row, skip_special_tokens=False).replace(tokenizer.pad_token, ""), closed))
    return results


def split_prompt(conversation):
    """Everything before the last assistant turn is the prompt; that turn is the reference answer."""
    msgs = conversation["conversations"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last], msgs[last]["content"]


def chat_metrics(model, tokenizer, eval_path, device, name_patterns, limit=None):
    """Share of held-out prompts answered in format (closed by <|im_end|>), and share of identity
    questions (reference answer mentions the name) answered with the name."""
    rows = read_jsonl(eval_path)[:limit]
    prompts, refs = zip(*(split_prompt(r) for r in rows))
    replies = generate_replies(model, tokenizer, list(prompts), device)
    in_format = sum(closed for _, closed in replies) / len(replies)
    name_re = re.compile("|".join(name_patterns), re.I)
    identity = [i for i, ref in enumerate(refs) if name_re.search(ref)]
    named = sum(bool(name_re.search(replies[i][0])) for i in identity) / max(len(identity), 1)
    samples = [(prompts[i][-1]["content"], replies[i][0]) for i in range(min(3, len(replies)))]
    return {"in_format": in_format, "identity_named": named, "n": len(replies), "n_identity": len(identity),
            "samples": samples}


def identity_share(model, tokenizer, eval_path, device, name_patterns):
    rows = read_jsonl(eval_path)
    prompts = [split_prompt(r)[0] for r in rows]
    replies = generate_replies(model, tokenizer, prompts, device)
    name_re = re.compile("|".join(name_patterns), re.I)
    return sum(bool(name_re.search(text)) for text, _ in replies) / len(replies), replies[:3], prompts[:3]


@torch.no_grad()
def preference_metrics(policy, reference, tokenizer, eval_path, max_len, device, beta=0.1):
    """Implicit-reward preference accuracy on held-out pairs: beta * (log pi - log ref) of the chosen reply
    above the rejected one (a tie counts half, so policy == reference scores 50%), and the mean margin."""
    from dataset.lm_dataset import DPODataset
    from train_dpo import sequence_logprobs
    policy.eval()
    reference.eval()
    ds = DPODataset(eval_path, tokenizer, max_length=max_len)
    collate = make_collate(0)
    wins, margins = 0.0, []
    for i in range(0, len(ds), 16):
        b = collate([ds[j] for j in range(i, min(i + 16, len(ds)))])
        ids = torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]]).to(device)
        labels = torch.cat([b["chosen_labels"], b["rejected_labels"]]).to(device)
        n = b["chosen_input_ids"].shape[0]
        pi, _ = sequence_logprobs(policy, ids, labels)
        ref, _ = sequence_logprobs(reference, ids, labels)
        reward = beta * (pi - ref)
        margin = reward[:n] - reward[n:]
        wins += float((margin > 0).sum() + 0.5 * (margin == 0).sum())
        margins += margin.tolist()
    return {"accuracy": wins / len(ds), "margin": sum(margins) / len(margins), "n": len(ds)}


def reasoning_metrics(model, tokenizer, eval_path, device, enable_thinking=None):
    """Share of held-out replies in the <think>...</think><answer>...</answer> template, and with the right answer.
    enable_thinking True/False: the prompt already holds <think>\n / the empty think block, so the reply is
    judged together with it (thinking off: the think block must stay empty and an answer follow)."""
    rows = read_jsonl(eval_path)
    prompts, refs = zip(*(split_prompt(r) for r in rows))
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    prefill = {None: "", True: "<think>\n", False: "<think>\n\n</think>\n"}[enable_thinking]
    replies = generate_replies(model, tokenizer, list(prompts), device, max_new_tokens=128, **kwargs)
    replies = [(prefill + text, closed) for text, closed in replies]
    template = THINK_OFF_TEMPLATE if enable_thinking is False else REASON_TEMPLATE
    in_template, right = 0, 0
    for (text, closed), ref in zip(replies, refs):
        m = template.match(text.strip()) if closed else None
        in_template += bool(m)
        want = REASON_TEMPLATE.match(ref.strip())
        right += bool(m and want and m.group(2).strip() == want.group(2).strip())
    return {"template": in_template / len(rows), "correct": right / len(rows), "n": len(rows),
            "samples": [(prompts[i][-1]["content"], replies[i][0]) for i in range(min(2, len(rows)))]}


def rl_metrics(model, tokenizer, eval_path, device):
    """Greedy replies to held-out RL prompts: the share in the <think>/<answer> template, and the share whose
    final answer equals the ground truth (checked like train_grpo.py's answer reward)."""
    from dataset.lm_dataset import ground_truth
    from trainer.rewards import Reply, answer_reward
    rows = read_jsonl(eval_path)
    prompts = [split_prompt(r)[0] for r in rows]
    replies = generate_replies(model, tokenizer, prompts, device, max_new_tokens=128)
    template = sum(bool(closed and REASON_TEMPLATE.match(text.strip())) for text, closed in replies)
    right = sum(answer_reward(Reply(p, text, ground_truth(r), closed)) for p, (text, closed), r in zip(prompts, replies, rows))
    return {"template": template / len(rows), "correct": right / len(rows), "n": len(rows),
            "samples": [(prompts[i][-1]["content"], replies[i][0]) for i in range(min(2, len(rows)))]}


def tool_metrics(model, tokenizer, eval_path, device, max_rounds=3, guided=True):
    """Held-out tool use, by real round trips: the model's calls are run with the real tools and their
    results fed back as `tool` messages until it answers (at most max_rounds replies). Per tool question: a
    well-formed call naming the reference's tool; arguments whose result equals the reference call's; a
    final answer holding the result of its last successful call. Per question that needs no tool: answered
    without a call. guided: calls decoded as eval_model.py and the server decode them by default
    (trainer/tool_guide.py); False: the model left free."""
    convs = []
    for row in read_jsonl(eval_path):
        msgs, tools = chat_messages(row["conversations"], "conversations")
        first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        ref_calls = msgs[first].get("tool_calls")
        ref = ref_calls[0]["function"] if ref_calls else None
        convs.append({"messages": msgs[:first], "tools": tools, "ref": ref, "results": [], "final": None, "first": None})
    active = convs
    for _ in range(max_rounds):
        replies = generate_replies(model, tokenizer, [c["messages"] for c in active], device, max_new_tokens=96,
                                   batch_size=16, tools=[c["tools"] for c in active], guided=guided)
        still = []
        for c, (text, closed) in zip(active, replies):
            content, calls = parse_tool_calls(text)
            if c["first"] is None:
                c["first"] = (text, calls)
            if not calls:
                c["final"] = content if closed else None
                continue
            if not all(isinstance(call, dict) and isinstance(call.get("arguments"), dict) for call in calls):
                continue  # a malformed call ends the conversation: nothing valid to send back
            results = [run_tool_call(call, TOOLS) for call in calls]
            c["results"] += results
            c["messages"] = c["messages"] + [
                {"role": "assistant", "content": content, "tool_calls": [
                    {"type": "function", "function": {"name": str(call.get("name")), "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
                    for call in calls]},
                *({"role": "tool", "content": r} for r in results)]
            still.append(c)
        active = still
        if not active:
            break
    tool_qs = [c for c in convs if c["ref"]]
    plain_qs = [c for c in convs if not c["ref"]]

    def first_call(c):
        calls = c["first"][1]
        return calls[0] if calls and isinstance(calls[0], dict) and isinstance(calls[0].get("arguments"), dict) else None

    right_tool = sum(bool(first_call(c)) and first_call(c).get("name") == c["ref"]["name"] for c in tool_qs)
    right_args = sum(bool(first_call(c)) and run_tool_call(first_call(c), TOOLS) == run_tool_call(c["ref"], TOOLS)
                     for c in tool_qs)
    ok_results = lambda c: [r for r in c["results"] if not r.startswith("error:")]  # noqa: E731
    answered = sum(bool(c["final"]) and bool(ok_results(c)) and ok_results(c)[-1] in c["final"] for c in tool_qs)
    direct = sum(not c["first"][1] and c["final"] is not None for c in plain_qs)
    samples = [(c["messages"][1]["content"] if c["messages"][0]["role"] == "system" else c["messages"][0]["content"],
                c["first"][0], c["results"], c["final"]) for c in tool_qs[:3]]
    return {"n_tool": len(tool_qs), "right_tool": right_tool / max(len(tool_qs), 1),
            "right_args": right_args / max(len(tool_qs), 1), "answer_has_result": answered / max(len(tool_qs), 1),
            "n_plain": len(plain_qs), "plain_direct": direct / max(len(plain_qs), 1), "samples": samples}
