"""Rollouts for RL: the current policy answers a batch of prompts, and we keep what the losses need.

`generate_rollout` is the one place replies are sampled. It runs the model itself: one forward over the
left-padded prompts fills the KV cache, then one forward per new token for the whole batch. A faster
backend (vLLM, SGLang, ...) can replace it if it returns the same `Rollout`, with the log-prob of every
sampled token under softmax(logits / temperature) of the policy that sampled it.

Log-probs are always those of softmax(logits / temperature): the rollout's, the policy's in the loss and the
reference's, so the ratio new/old is exactly 1 before the first update. --top_p only narrows which tokens
can be drawn.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dataset.lm_dataset import RLPromptDataset, VerifiableRLPromptDataset
from model.model_minimind import output_cache
from trainer_utils import UserError, add_bool, float_in, positive_float, positive_int, str2bool, unwrap


def add_rollout_args(parser, num_generations):
    g = parser.add_argument_group("rollouts")
    g.add_argument("--num_generations", type=positive_int, default=num_generations, help="replies sampled per prompt (G)")
    g.add_argument("--max_new_tokens", "--max_gen_len", dest="max_new_tokens", type=positive_int, default=256,
                   help="longest reply; a reply cut here has no end token and all its tokens count")
    g.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature of the rollouts (> 0)")
    g.add_argument("--top_p", type=float_in(0, 1, lo_open=True), default=1.0, help="nucleus sampling: draw only from the most likely tokens "
                                                             "whose probabilities add up to this (1: all)")
    g.add_argument("--enable_thinking", type=str2bool, nargs="?", const=True, default=None, metavar="0|1",
                   help="passed to the chat template: 1 opens the reply with <think>, 0 pre-fills an empty think "
                        "block; unset: the template's plain generation prompt")
    g.add_argument("--thinking_ratio", type=float_in(0, 1), default=None,
                   help="instead of --enable_thinking: this share of the prompts get thinking on, the rest off (drawn "
                        "once per prompt, so a resumed run sees the same), as MiniMind-3 trains")
    add_bool(g, "--show_samples", "--debug_mode", help="print one prompt's replies and rewards (--debug_mode: MiniMind-3's name)")
    g.add_argument("--sample_interval", "--debug_interval", dest="sample_interval", type=positive_int, default=None,
                   help="with --show_samples: every this many steps (unset: at every log line)")
    g.add_argument("--rollout_engine", default="torch", choices=["torch", "sglang"],
                   help="torch: sampled in-process with the KV cache (generate_rollout); MiniMind-3's sglang (an "
                        "SGLang server) is not supported here")
    for name in ("--sglang_base_url", "--sglang_model_path", "--sglang_shared_path"):
        g.add_argument(name, default=None, help="read only with --rollout_engine sglang (accepted so MiniMind-3 command lines parse)")
    return g


def check_rollout_args(args):
    if args.compile:
        raise UserError("--compile is not supported for RL (the rollout shapes change at every step)")
    if args.rollout_engine == "sglang":
        raise UserError("--rollout_engine sglang: this toolkit samples rollouts in-process with the KV cache "
                        "(trainer/rollout.py), not from an SGLang server; drop the flag (torch is the default)")
    if args.thinking_ratio is not None and args.enable_thinking is not None:
        raise UserError("--thinking_ratio and --enable_thinking both given: pass one (a share of prompts thinking, or all/none)")


def load_prompts(args, tokenizer, need_gt=False, dataset=None):
    """The RL prompts of --data_path; with need_gt (a reward checks answers) every line must carry its answer.
    dataset: another prompt dataset class that takes the same flags (train_agent.py's AgentPromptDataset)."""
    dataset = dataset or (VerifiableRLPromptDataset if need_gt else RLPromptDataset)
    return dataset(args.data_path, tokenizer, max_length=args.max_seq_len, enable_thinking=args.enable_thinking,
                   thinking_ratio=args.thinking_ratio, skip_bad_lines=args.skip_bad_lines,
                   conversations_column=args.conversations_column)


def show_samples(args, ctx, step, rollout, rewards, group_size):
    """--show_samples: the first prompt's replies of the step's last rollout with their rewards."""
    if args.show_samples and step % (args.sample_interval or args.log_interval) == 0:
        for text, r in zip(rollout.texts[:group_size], rewards[:group_size].tolist()):
            ctx.print(f"    reward {r:+.3f} | {text!r}")


@dataclass
class Rollout:
    input_ids: torch.Tensor       # [N, P + R] left-padded prompt, then the sampled reply (padding after its end)
    attention_mask: torch.Tensor  # [N, P + R] 1 on prompt and reply tokens (the end token included), 0 on padding
    reply_mask: torch.Tensor      # [N, R] float: 1 on reply tokens up to and including the end token
    old_logps: torch.Tensor       # [N, R] log-prob of each sampled token when it was sampled (0 outside the reply)
    prompt_len: int               # P: replies start at this column
    texts: list                   # each reply as text, without its end token
    finished: list                # whether each reply ended with the end token (not cut by max_new_tokens)

    @property
    def reply_ids(self):
        return self.input_ids[:, self.prompt_len:]

    def rows(self, index):
        """The rollout of the replies at `index` (a 1-D tensor of row numbers)."""
        picked = index.tolist()
        return Rollout(self.input_ids[index], self.attention_mask[index], self.reply_mask[index], self.old_logps[index],
                       self.prompt_len, [self.texts[i] for i in picked], [self.finished[i] for i in picked])


def left_pad(sequences, pad_id, device):
    """Token-id lists -> (ids, attention mask) [N, T], padded on the left so every row ends at the right edge."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def token_logps(logits, tokens, temperature=1.0):
    """log softmax(logits / temperature)[token], in float32. logits [..., V], tokens [...]."""
    if temperature > 0:
        logits = logits.float() / temperature
    return -F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens.reshape(-1),
                            reduction="none").view(tokens.shape)


def sample_tokens(logits, temperature, top_p, generator=None):
    """One token per row of logits [N, V]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if 0 < top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_rollout(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_p=1.0, generator=None):
    """Sample one reply to each prompt (a list of token-id lists; repeat a prompt G times for a group of G)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, prompt_mask = left_pad(prompts, pad, next(model.parameters()).device)
    prompt_len, mask = ids.shape[1], prompt_mask
    out = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    alive = torch.ones(len(prompts), dtype=torch.bool, device=ids.device)
    tokens, logps, real = [], [], []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        token = torch.where(alive, sample_tokens(logits, temperature, top_p, generator), pad)
        tokens.append(token)
        logps.append(token_logps(logits, token, temperature))
        real.append(alive.clone())
        alive &= token != eos
        if not alive.any():
            break
        mask = torch.cat([mask, real[-1].long()[:, None]], dim=1)
        out = model(token[:, None], attention_mask=mask, past_key_values=output_cache(out), use_cache=True)
    model.train(was_training)

    reply = torch.stack(tokens, dim=1)
    reply_mask = torch.stack(real, dim=1).float()
    texts, finished = [], []
    for row, n in zip(reply.tolist(), reply_mask.sum(dim=1).long().tolist()):
        row = row[:n]
        finished.append(bool(row) and row[-1] == eos)
        texts.append(tokenizer.decode(row[:-1] if finished[-1] else row, skip_special_tokens=False))
    return Rollout(input_ids=torch.cat([ids, reply], dim=1),
                   attention_mask=torch.cat([prompt_mask, reply_mask.long()], dim=1),
                   reply_mask=reply_mask, old_logps=torch.stack(logps, dim=1) * reply_mask, prompt_len=prompt_len,
                   texts=texts, finished=finished)


def reply_logps(model, rollout, temperature=1.0):
    """Log-probs of the rollout's reply tokens under `model`, from one full forward over prompt + reply
    (with gradients when the caller allows them), and the MoE balancing loss of that forward."""
    R = rollout.reply_mask.shape[1]
    out = model(rollout.input_ids, attention_mask=rollout.attention_mask, logits_to_keep=R + 1)
    return token_logps(out.logits[:, :-1], rollout.reply_ids, temperature), out.aux_loss
