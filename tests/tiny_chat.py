"""A tiny chat model that has learned a few conversations by heart, for tests that need a model which
really emits a tool call, a think block, a `<script>` tag or an endless reply (the server, the web page,
eval_model.py --tools). It is trained here, in seconds on a CPU, through the real data path (a jsonl file
read by SFTDataset, rendered by the shipped chat template) and the real model and loss; greedy decoding
then replays the replies.

    path = train_tiny_chat_model(tmp_dir)    # -> tmp_dir/full_sft_64.pth (+ .json)
"""
import json
import os

import torch

import torch.nn.functional as F

from dataset.lm_dataset import SFTDataset, load_tokenizer, make_pack_collate
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.tools import TOOLS
from trainer_utils import save_weights

CALCULATOR = [TOOLS["calculator"].schema]  # what the tool conversations are trained with (serve --tools calculator)
HELLO, HELLO_REPLY = "Say hi", "Hi! I am a tiny model."
THINK, THINK_REASONING, THINK_ANSWER = "Think first", "Let me think.", "The answer is 42."
SCRIPT, SCRIPT_REPLY = "Show a tag", "<script>alert(1)</script> is a tag"
SING = "Sing"  # its reply repeats "la" and was learned without an end, so it goes on until max_tokens
MATH, MATH_CALL, MATH_RESULT, MATH_ANSWER = "What is 12*7?", {"expression": "12*7"}, "84", "12*7 = 84."
# A call written wrong, as the demo's 1.6M model sometimes writes one: the expression runs on into another tool's
# fields, so the block is not JSON. A model that learned only this (BROKEN_CONVERSATIONS) shows what
# trainer/tool_guide.py makes of it.
BROKEN, BROKEN_REPLY = "Call it wrong", '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6, "from": "f", "to": "kg"}}\n</tool_call>'
BROKEN_CONVERSATIONS = [{"tools": CALCULATOR, "conversations": [{"role": "user", "content": BROKEN},
                                                                {"role": "assistant", "content": BROKEN_REPLY}]}]
CALL_MESSAGE = {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": MATH_CALL}}]}

CONVERSATIONS = [
    {"conversations": [{"role": "user", "content": HELLO}, {"role": "assistant", "content": HELLO_REPLY}]},
    {"conversations": [{"role": "user", "content": THINK}, {"role": "assistant", "reasoning_content": THINK_REASONING,
                                                              "content": f"<answer>\n{THINK_ANSWER}\n</answer>"}]},
    {"conversations": [{"role": "user", "content": SCRIPT}, {"role": "assistant", "content": SCRIPT_REPLY}]},
    # the two-turn chat the history tests hold: the second reply is learned in that context too, not left to luck
    {"conversations": [{"role": "user", "content": HELLO}, {"role": "assistant", "content": HELLO_REPLY},
                       {"role": "user", "content": SCRIPT}, {"role": "assistant", "content": SCRIPT_REPLY}]},
    {"tools": CALCULATOR, "conversations": [{"role": "user", "content": MATH}, CALL_MESSAGE,
                                            {"role": "tool", "content": MATH_RESULT},
                                            {"role": "assistant", "content": MATH_ANSWER}]},
    {"tools": CALCULATOR, "conversations": [{"role": "user", "content": HELLO}, {"role": "assistant", "content": HELLO_REPLY}]},
]
SING_LINE = {"conversations": [{"role": "user", "content": SING}, {"role": "assistant", "content": "la " * 200}]}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def train_tiny_chat_model(out_dir, max_steps=300, lr=1e-2, conversations=CONVERSATIONS, sing=True):
    """Train until the replies are learned by heart; returns the weight file (full_sft_64.pth)."""
    tokenizer = load_tokenizer()
    os.makedirs(out_dir, exist_ok=True)
    chat_path, sing_path = os.path.join(out_dir, "chat.jsonl"), os.path.join(out_dir, "sing.jsonl")
    with open(chat_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations)
    with open(sing_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(SING_LINE) + "\n")
    samples = list(SFTDataset(chat_path, tokenizer, max_length=1024))
    if sing:
        samples += list(SFTDataset(sing_path, tokenizer, max_length=48))  # cut before <|im_end|>: it never learns to stop
    # one packed row, and the output layer (most of this model's compute) only where a label is learned
    input_ids, labels, position_ids = make_pack_collate(max_length=sum(len(ids) for ids, _ in samples))(samples)
    assert input_ids.shape[0] == 1
    targets = labels[0, 1:]
    keep = (targets != -100).nonzero().squeeze(1)

    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY, vocab_size=len(tokenizer)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(max_steps):
        logits = model(input_ids, position_ids=position_ids, packed=True, logits_to_keep=keep).logits[0]
        loss = F.cross_entropy(logits, targets[keep])  # the SFT loss: next-token cross-entropy on the labelled tokens
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if loss.item() < 0.02:
            break
    assert loss.item() < 0.02, f"the tiny chat model did not learn its conversations (loss {loss.item():.3f})"
    path = os.path.join(out_dir, "full_sft_64.pth")
    save_weights(model, path)
    return path
