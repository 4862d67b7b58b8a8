"""
Train MiniMind's byte-level BPE tokenizer (vocab 6400) from a pretrain jsonl ({"text": ...} per line).

    python dataset/build_demo_data.py                                  # builds dataset/demo/
    python train_tokenizer.py --data_path dataset/demo/pretrain_hq.jsonl  # writes model/tokenizer*.json

Fixed ids: <|endoftext|> 0 (pad/unk), <|im_start|> 1 (bos), <|im_end|> 2 (eos); then <think> </think>
<answer> </answer> (3..6) and <tool_call> </tool_call> <tool_response> </tool_response> (7..10) as added
tokens that never split; then 16 spare special tokens <|reserved_0|> .. <|reserved_15|> (11..26). The text is read as a stream (one line at a
time), so a multi-GB file never sits in memory; the BPE trainer's own word-count table still grows with
the number of distinct words, so for big corpora cap it with --max_lines and/or --sample_rate.
Output is deterministic: same input file and flags -> byte-identical tokenizer.json.
"""
import argparse
import json
import os
import random

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from trainer.cli import ArgumentParser, UserError, float_in, int_in, positive_int, run_main, seed_int
from trainer.file_io import atomic_write_files

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]  # ids 3..6
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]  # ids 7..10
# Spare special tokens (ids 11..26): a future tag takes one of these without retraining the tokenizer.
RESERVED_TOKENS = [f"<|reserved_{i}|>" for i in range(16)]
# Tags a reply is made of: added tokens that never split, yet not "special", so that
# decode(skip_special_tokens=True) keeps them and a reply can still be parsed for its think part and tool calls.
TAG_TOKENS = REASONING_TOKENS + TOOL_TOKENS
FIXED_TOKENS = SPECIAL_TOKENS + TAG_TOKENS + RESERVED_TOKENS  # ids 0..26, in this order
MIN_VOCAB = 256 + len(FIXED_TOKENS)  # every byte, plus the fixed tokens

# ChatML, no default system prompt: <|im_start|>{role}\n{content}<|im_end|>\n per message, plus (Qwen's
# conventions, OpenAI's field names):
# - `tools` (OpenAI function schemas) go into the system turn, one JSON object a line inside <tools></tools>,
#   with the instruction to call one as <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call> (Qwen's
#   layout with a shorter instruction: a 6400-token vocabulary spends about two tokens per English word);
# - an assistant message renders `reasoning_content` (when present, even empty) as <think>\n...\n</think>\n
#   before its content, then each of its `tool_calls` as a <tool_call> block;
# - `role: "tool"` results become <tool_response> blocks, consecutive ones in one user turn;
# - the generation prompt follows `enable_thinking` (MiniMind-3's `open_thinking` is an alias): true opens
#   the reply with <think>\n, false pre-fills the empty think block <think>\n\n</think>\n so the model answers
#   directly, unset leaves the reply to the model (the reasoning model opens <think> itself).
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' and messages[0]['content'] %}"
    "{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call these functions:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nTo call one, reply with:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message['reasoning_content'] is string %}"
    "{{- '<think>\\n' + message['reasoning_content'].strip('\\n') + '\\n</think>\\n' }}"
    "{%- endif %}"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{%- if call['function'] is defined %}{%- set call = call['function'] %}{%- endif %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{%- if call['arguments'] is string %}{{- call['arguments'] }}{%- else %}{{- call['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is not none %}{%- set thinking = enable_thinking %}"
    "{%- elif open_thinking is defined %}{%- set thinking = open_thinking %}{%- endif %}"
    "{%- if thinking is defined and thinking is true %}{{- '<think>\\n' }}"
    "{%- elif thinking is defined and thinking is false %}{{- '<think>\\n\\n</think>\\n' }}{%- endif %}"
    "{%- endif %}"
)
SAMPLE_ZH = ("人工智能是计算机科学的一个分支，它试图理解智能的实质，并生产出一种新的能以人类智能相似的方式"
             "做出反应的智能机器。今天天气很好，我们一起去公园散步吧！")
SAMPLE_EN = ("The quick brown fox jumps over the lazy dog. Language models learn to predict the next token "
             "from the previous ones, one small step at a time.")


class CorpusError(UserError, ValueError):
    """A bad line in the training corpus (one-line message: path:LINE: problem. hint)."""


def iter_texts(path, max_lines=None, sample_rate=1.0, seed=42, skip_bad_lines=False, stats=None):
    """Yield the "text" of each jsonl line, streaming. Sampling is a seeded coin per line -> deterministic."""
    rng = random.Random(seed)
    stats = stats if stats is not None else {}
    stats.update(kept=0, skipped=0)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if sample_rate < 1.0 and rng.random() >= sample_rate:
                continue
            try:
                obj = json.loads(raw)
                text = obj["text"]
                if not isinstance(text, str):
                    raise TypeError("'text' is not a string")
                text.encode("utf-8")  # a lone surrogate escape ("\\ud800") is valid JSON no tokenizer can take
            except Exception as e:  # noqa: BLE001 - report any bad line the same way
                if skip_bad_lines:
                    stats["skipped"] += 1
                    continue
                why = e.msg if isinstance(e, json.JSONDecodeError) else f"{type(e).__name__}: {e}"
                raise CorpusError(f"{path}:{lineno}: not a pretrain line {{\"text\": ...}} ({why}). "
                                  "Fix the line or pass --skip_bad_lines.") from None
            yield text
            stats["kept"] += 1
            if max_lines is not None and stats["kept"] >= max_lines:
                return


def train(texts, vocab_size=6400):
    """Byte-level BPE as in MiniMind: no normalizer, GPT-2 style pre-tokenizer, no prefix space."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=FIXED_TOKENS,  # the trainer puts these first -> ids 0..26
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    for i, t in enumerate(FIXED_TOKENS):
        assert tok.token_to_id(t) == i, f"{t} got id {tok.token_to_id(t)}, expected {i}"
    return tok


def tokenizer_config(tok):
    added = {}
    for i, t in enumerate(FIXED_TOKENS):
        added[str(i)] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": t not in TAG_TOKENS}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,  # datasets add <|im_start|> themselves where they want it
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "chat_template": CHAT_TEMPLATE,
    }


def save(tok, out_dir):
    """Both files replaced together, only once both are written: a full disk cannot leave a half tokenizer."""
    os.makedirs(out_dir, exist_ok=True)
    tokenizer_json = tok.to_str(pretty=True).encode("utf-8")
    config_json = (json.dumps(tokenizer_config(tok), ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    atomic_write_files({os.path.join(out_dir, "tokenizer.json"): lambda f: f.write(tokenizer_json),
                        os.path.join(out_dir, "tokenizer_config.json"): lambda f: f.write(config_json)})


def check(out_dir):
    """Load the result the way the training scripts will and print a round trip and chars/token."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    msgs = [{"role": "user", "content": "你好，1+1等于几？"}, {"role": "assistant", "content": "<think>\n1+1=2\n</think>\n<answer>\n2\n</answer>"}]
    rendered = hf.apply_chat_template(msgs, tokenize=False)
    ids = hf.encode(rendered, add_special_tokens=False)
    ok = hf.decode(ids) == rendered
    print(f"vocab {len(hf)}  bos={hf.bos_token}:{hf.bos_token_id} eos={hf.eos_token}:{hf.eos_token_id} "
          f"pad={hf.pad_token}:{hf.pad_token_id}")
    print(f"round trip {'OK' if ok else 'FAILED'}: {rendered!r} -> {len(ids)} tokens")
    for name, text in (("Chinese", SAMPLE_ZH), ("English", SAMPLE_EN)):
        n = len(hf.encode(text, add_special_tokens=False))
        print(f"{name}: {len(text)} chars -> {n} tokens = {len(text) / n:.2f} chars/token")
    return ok


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default="dataset/demo/pretrain_hq.jsonl", help='jsonl with {"text": ...} lines')
    p.add_argument("--out_dir", default="model")
    p.add_argument("--vocab_size", type=int_in(MIN_VOCAB), default=6400,
                   help=f"at least {MIN_VOCAB}: the 256 byte tokens and the {len(FIXED_TOKENS)} fixed tokens")
    p.add_argument("--max_lines", type=positive_int, default=None, help="use at most this many (sampled) lines")
    p.add_argument("--sample_rate", type=float_in(0, 1, lo_open=True), default=1.0, help="keep each line with this probability (seeded)")
    p.add_argument("--seed", type=seed_int, default=42)
    p.add_argument("--skip_bad_lines", action="store_true")
    args = p.parse_args()
    if not os.path.isfile(args.data_path):
        raise UserError(f"{args.data_path}: not found. Build the demo corpus with `python dataset/build_demo_data.py` "
                        "or pass --data_path.")
    stats = {}
    texts = iter_texts(args.data_path, args.max_lines, args.sample_rate, args.seed, args.skip_bad_lines, stats)
    tok = train(texts, args.vocab_size)
    if stats["kept"] == 0:
        raise UserError(f"{args.data_path}: no text lines to train on.")
    save(tok, args.out_dir)
    print(f"trained on {stats['kept']} lines of {args.data_path}"
          + (f" ({stats['skipped']} bad lines skipped)" if stats["skipped"] else "")
          + f"; wrote {args.out_dir}/tokenizer.json, tokenizer_config.json")
    if not check(args.out_dir):
        raise UserError(f"{args.out_dir}: the saved tokenizer does not round-trip the chat template")


if __name__ == "__main__":
    run_main(main)
