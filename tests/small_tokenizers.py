"""Small byte-level BPE tokenizers built in the test, shaped like MiniMind's own (nothing downloaded).

- `minimind2_like`: specials <unk> 0 (pad), <s> 1 (bos), </s> 2 (eos); <think>/<answer> are NOT tokens, so
  each tag is several tokens; its chat template adds a default system prompt when the conversation has none.
- `minimind3_like`: specials <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2; <think>, </think>, <tool_call>,
  </tool_call> are single (non-special) tokens, <answer> is not a token; its template renders every assistant
  turn with a think block (empty when there is no reasoning) and opens one in the generation prompt.

Each builder writes tokenizer.json + tokenizer_config.json into a folder and returns the folder, so a test
can pass it as --tokenizer_path or load it with AutoTokenizer.from_pretrained.
"""
import json
import os

CORPUS = [
    "你好，我是一个小模型。今天天气很好，我们去公园散步吧。",
    "人工智能是计算机科学的一个分支，它研究如何让机器像人一样思考。",
    "The quick brown fox jumps over the lazy dog. Numbers: 12345 and 3.14.",
    "<think>\n先想一想。\n</think>\n<answer>\n答案是二。\n</answer>",
    "Python is a programming language. def main(): return 42",
    "中国的首都是北京。一年有十二个月，一周有七天。",
]

MINIMIND2_SYSTEM = "你是 MiniMind，是一个有用的人工智能助手。"

# MiniMind2's layout: <s>role\n...</s>\n turns, a default system turn when the messages bring none.
MINIMIND2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{ '<s>system\\n' + messages[0]['content'] + '</s>\\n' }}"
    "{%- else %}{{ '<s>system\\n" + MINIMIND2_SYSTEM + "</s>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<s>user\\n' + message['content'] + '</s>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{ '<s>assistant\\n' + message['content'] + '</s>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<s>assistant\\n' }}{%- endif %}"
)

# MiniMind-3's layout: ChatML whose assistant turns always carry a think block, empty unless reasoning is given.
MINIMIND3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set reasoning = message.get('reasoning_content') or '' %}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)


def _build(folder, specials, added, template, vocab_size, bos, eos, pad, unk):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    if added:
        tok.add_tokens(added)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
              "bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk,
              "clean_up_tokenization_spaces": False, "model_max_length": 32768, "chat_template": template}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return str(folder)


def minimind2_like(folder, vocab_size=400):
    return _build(folder, ["<unk>", "<s>", "</s>"], [], MINIMIND2_TEMPLATE, vocab_size,
                  bos="<s>", eos="</s>", pad="<unk>", unk="<unk>")


def minimind3_like(folder, vocab_size=400):
    return _build(folder, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<tool_call>", "</tool_call>", "<think>", "</think>"],
                  MINIMIND3_TEMPLATE, vocab_size, bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>", unk="<|endoftext|>")
