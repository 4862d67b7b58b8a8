"""Rewards for RL: each a small function of one reply, combined with weights by --rewards / --reward_weights.

    format      1 if the reply is <think>\\n...\\n</think>\\n<answer>\\n...\\n</answer> and ended, else 0
    answer      1 if the reply's final answer equals the data's ground truth ("gt"), else 0; numbers
                compare as numbers (42 = 42.0 = 84/2), other answers as case- and space-insensitive text
    repetition  minus the share of the reply's 3-grams (words, digits, CJK characters) that repeat an
                earlier one: 0 for no repeats, near -1 for a reply stuck in a loop
    length      0 inside --length_min..--length_max characters, down to -1 outside; -1 for a reply cut
                off at --max_new_tokens
    model       the score of a local transformers sequence-classification model (--reward_model_path)
"""
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

import torch

from trainer_utils import UserError, add_bool, nonneg_int, positive_int


@dataclass
class Reply:
    """What a reward sees: the prompt, the assistant's text (anything the template pre-filled, then the
    sampled reply), the accepted answers (empty when the data has none) and whether the reply ended."""
    messages: list
    text: str
    gt: list
    finished: bool


# ----------------------------------------------------------------------------------------------------
# format and answer
REASONING_FORMAT = re.compile(r"\s*<think>\n(.+?)\n</think>\n<answer>\n(.+?)\n</answer>\s*", re.S)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(reply):
    """1 for a finished reply in the reasoning template, each tag exactly once, else 0."""
    ok = (reply.finished and REASONING_FORMAT.fullmatch(reply.text) is not None
          and all(reply.text.count(tag) == 1 for tag in TAGS))
    return 1.0 if ok else 0.0


def final_answer(text):
    """The part of a reply that states its answer: the last <answer> block, else what follows </think>,
    else the whole reply; a reply still inside its <think> block has none."""
    blocks = re.findall(r"<answer>(.*?)</answer>", text, re.S)
    if blocks:
        return blocks[-1].strip()
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1].strip()
    return "" if "<think>" in text else text.strip()


NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?")


def parse_number(s):
    """'42', '-3.5', '1,234', '3/4', '50%' -> Fraction; anything else -> None."""
    s = unicodedata.normalize("NFKC", s).strip()
    if not NUMBER.fullmatch(s):
        return None
    percent = s.endswith("%")
    s = s.rstrip("%").replace(",", "")
    num, _, den = s.partition("/")
    try:
        value = Fraction(num) / Fraction(den) if den else Fraction(num)
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def normalize_text(s):
    s = unicodedata.normalize("NFKC", s).lower()
    return re.sub(r"\s+", " ", s).strip().rstrip("。.!！?？")


def answer_is_right(answer, gt):
    """A numeric ground truth matches the answer's last number; other ground truths match the normalized text."""
    want = parse_number(gt)
    if want is not None:
        numbers = NUMBER.findall(unicodedata.normalize("NFKC", answer))
        return bool(numbers) and parse_number(numbers[-1]) == want
    return normalize_text(answer) == normalize_text(gt)


def answer_reward(reply):
    answer = final_answer(reply.text)
    return 1.0 if answer and any(answer_is_right(answer, gt) for gt in reply.gt) else 0.0


# ----------------------------------------------------------------------------------------------------
# repetition and length
UNITS = re.compile(r"[\u4e00-\u9fff]|[A-Za-z]+|\d+|[^\sA-Za-z\d\u4e00-\u9fff]")


def repetition_reward(reply, n=3):
    units = UNITS.findall(reply.text)
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    if not grams:
        return 0.0
    return -(len(grams) - len(set(grams))) / len(grams)


def length_reward(reply, low, high):
    if not reply.finished:
        return -1.0
    n = len(reply.text)
    if n < low:
        return -(low - n) / max(low, 1)
    if n > high:
        return -min(1.0, (n - high) / max(high, 1))
    return 0.0


# ----------------------------------------------------------------------------------------------------
# a reward model
class RewardModel:
    """A local transformers reward model folder (config.json, weights, tokenizer), scoring the conversation with
    the reply's final answer as the assistant turn. Two kinds:
    - a sequence-classification model (AutoModelForSequenceClassification): the first logit is the reward;
    - a model whose own code (the folder's auto_map, run only with trust_remote_code) has
      get_score(tokenizer, messages), as InternLM2-reward, MiniMind-3's default: its score is the reward, and it
      is asked as MiniMind-3 asks it (the earlier turns folded into one user message)."""

    def __init__(self, path, device, max_length=1024, trust_remote_code=False):
        if not os.path.isdir(path):
            raise UserError(f"--reward_model_path {path}: no such folder (a local transformers sequence-classification "
                            f"model folder; nothing is downloaded)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"--reward_model_path {path}: no config.json, so not a transformers model folder")
        self.path, self.device, self.max_length, self.trust_remote_code = path, device, max_length, trust_remote_code
        self.model = self.tokenizer = None
        self.custom = self._custom_code()

    def _custom_code(self):
        """The auto_map entry of a model that brings its own code and no sequence-classification head, else None."""
        try:
            with open(os.path.join(self.path, "config.json"), encoding="utf-8") as f:
                auto_map = json.load(f).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            return None  # from_pretrained reports a bad config.json below
        if "AutoModelForSequenceClassification" in auto_map or "AutoModel" not in auto_map:
            return None
        if not self.trust_remote_code:
            raise UserError(f"--reward_model_path {self.path}: its model is Python code from that folder "
                            f"({auto_map['AutoModel']}); pass --trust_remote_code 1 to run it")
        return auto_map["AutoModel"]

    def load(self):
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
        remote = dict(local_files_only=True, trust_remote_code=self.trust_remote_code)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, **remote)
            model = (AutoModel if self.custom else AutoModelForSequenceClassification).from_pretrained(self.path, **remote)
        except Exception as e:  # noqa: BLE001 - any failure to load is the same user mistake
            what = "its model" if self.custom else "a sequence-classification model"
            raise UserError(f"--reward_model_path {self.path}: cannot load {what} and its tokenizer "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:160]})") from None
        if self.custom and not callable(getattr(model, "get_score", None)):
            raise UserError(f"--reward_model_path {self.path}: its model ({self.custom}) has no get_score(tokenizer, messages), "
                            f"and no sequence-classification head; use a reward model that has one of them")
        dtype = torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def render(self, reply):
        messages = reply.messages + [{"role": "assistant", "content": final_answer(reply.text)}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)

    @staticmethod
    def folded(reply):
        """MiniMind-3's question to a get_score model: the earlier turns as "role: content" lines, then the last."""
        history, last = reply.messages[:-1], reply.messages[-1]["content"] if reply.messages else ""
        context = "\n".join(f"{m['role']}: {m['content']}" for m in history)
        question = f"{context}\n以上是对话历史。我的新问题是：\n{last}" if context else last
        return [{"role": "user", "content": question}, {"role": "assistant", "content": final_answer(reply.text)}]

    @torch.no_grad()
    def __call__(self, replies):
        if self.model is None:
            self.load()  # on first use
        if self.custom:
            return [float(self.model.get_score(self.tokenizer, self.folded(r))) for r in replies]
        enc = self.tokenizer([self.render(r) for r in replies], return_tensors="pt", padding=True, truncation=True,
                             max_length=self.max_length, add_special_tokens=False).to(self.device)
        return self.model(**enc).logits[:, 0].float().tolist()


# ----------------------------------------------------------------------------------------------------
# combining them
REWARDS_HELP = ("comma-separated rewards to add up: format (the <think>/<answer> template), answer (right final answer; "
                "needs \"gt\" in the data), repetition (repeated 3-grams), length (--length_min..--length_max characters), "
                "model (--reward_model_path)")


def add_reward_args(parser, rewards, rewards_help=REWARDS_HELP):
    g = parser.add_argument_group("rewards")
    g.add_argument("--rewards", default=rewards, help=rewards_help)
    g.add_argument("--reward_weights", default=None, help="comma-separated weights, one per reward; unset: all 1")
    g.add_argument("--length_min", type=nonneg_int, default=20, help="length reward: shortest reply without penalty, in characters")
    g.add_argument("--length_max", type=positive_int, default=800, help="length reward: longest reply without penalty, in characters")
    g.add_argument("--reward_model_path", default=None,
                   help="the model reward: a local transformers AutoModelForSequenceClassification folder, or one whose "
                        "own code has get_score(tokenizer, messages) such as InternLM2-reward (with --trust_remote_code 1)")
    add_bool(g, "--trust_remote_code",
             help="let --reward_model_path run the Python code in its folder (custom reward models such as "
                  "internlm2-1_8b-reward, MiniMind-3's default); only for folders you trust")
    return g


def score_rollout(rewards, samples, rollout, device):
    """Score a rollout's replies to `samples` (dataset items, each answered G times in a row)."""
    G = len(rollout.texts) // len(samples)
    replies = [Reply(s["messages"], s["reply_prefix"] + text, s["gt"], done)
               for s, text, done in zip((s for s in samples for _ in range(G)), rollout.texts, rollout.finished)]
    return rewards(replies, device)


def reward_metrics(total, parts):
    """The numbers to log about a batch's rewards: mean and std of the total, mean of each part."""
    return {"reward": total.mean(), "reward_std": total.std(unbiased=False), **{f"reward_{k}": v.mean() for k, v in parts.items()}}


REPLY_REWARDS = {"format": format_reward, "answer": answer_reward, "repetition": repetition_reward}


class Rewards:
    """The weighted sum of the rewards named by --rewards; also returns each part for the log.
    functions: the rewards of one reply by name (train_agent.py scores whole episodes with its own); length
    and model are always there."""

    def __init__(self, args, device, functions=REPLY_REWARDS):
        self.functions = functions
        known = [*functions, "length", "model"]
        self.names = [n.strip() for n in args.rewards.split(",") if n.strip()]
        unknown = [n for n in self.names if n not in known]
        if not self.names or unknown:
            raise UserError(f"--rewards {args.rewards}: unknown reward {', '.join(unknown) or '(none)'}; "
                            f"choose from {', '.join(known)}")
        if len(set(self.names)) != len(self.names):
            raise UserError(f"--rewards {args.rewards}: a reward is named twice")
        self.weights = [1.0] * len(self.names)
        if args.reward_weights:
            try:
                self.weights = [float(w) for w in args.reward_weights.split(",")]
            except ValueError:
                raise UserError(f"--reward_weights {args.reward_weights}: expected comma-separated numbers") from None
            if len(self.weights) != len(self.names) or not all(math.isfinite(w) for w in self.weights):
                raise UserError(f"--reward_weights {args.reward_weights}: need one finite number for each of "
                                f"--rewards {','.join(self.names)}")
        if args.length_min < 0 or args.length_max < args.length_min:
            raise UserError(f"--length_min {args.length_min} / --length_max {args.length_max}: need 0 <= min <= max")
        if ("model" in self.names) != bool(args.reward_model_path):
            raise UserError("--rewards model needs --reward_model_path, and --reward_model_path is only used with "
                            "model in --rewards; give both or neither")
        self.length = (args.length_min, args.length_max)
        self.reward_model = (RewardModel(args.reward_model_path, device, trust_remote_code=args.trust_remote_code)
                             if "model" in self.names else None)
        self.need_gt = "answer" in self.names

    def score(self, name, replies):
        if name == "model":
            return self.reward_model(replies)
        if name == "length":
            return [length_reward(r, *self.length) for r in replies]
        return [self.functions[name](r) for r in replies]

    def __call__(self, replies, device):
        """-> (total reward per reply [N], {name: that reward per reply [N]})."""
        parts = {name: torch.tensor(self.score(name, replies), dtype=torch.float32, device=device) for name in self.names}
        total = sum(w * parts[name] for name, w in zip(self.names, self.weights))
        return total, parts
