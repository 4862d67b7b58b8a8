"""The shipped tokenizer (model/): special ids, round trips, ChatML template, and that train_tokenizer.py
reproduces it from the demo corpus."""
import hashlib
import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataset.lm_dataset import load_tokenizer  # noqa: E402
import train_tokenizer  # noqa: E402

# The shipped model/tokenizer.json was trained on this exact demo corpus. The English half of the corpus
# comes from the running Python's pydoc_data, so another Python release builds a slightly different corpus:
# then the reproduction test is skipped rather than failed.
SHIPPED_CORPUS_SHA256 = "6d25514dde5b1aea008eee235195b0e7db69870206dd5b319510edb5cdc096cf"
SHIPPED_WITH_PYTHON = "3.11.7"

SPECIALS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2,
            "<think>": 3, "</think>": 4, "<answer>": 5, "</answer>": 6,
            "<tool_call>": 7, "</tool_call>": 8, "<tool_response>": 9, "</tool_response>": 10,
            **{f"<|reserved_{i}|>": 11 + i for i in range(16)}}
TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_special_tokens_have_fixed_ids_and_never_split(tok):
    assert len(tok) == 6400
    for t, i in SPECIALS.items():
        assert tok.convert_tokens_to_ids(t) == i
        assert tok.encode(t, add_special_tokens=False) == [i]
        ids = tok.encode(f"前文{t}后文 and more", add_special_tokens=False)
        assert ids.count(i) == 1
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 0, 1, 2)
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello", add_special_tokens=False)  # no auto bos


@pytest.mark.parametrize("text", [
    "今天天气很好，我们去公园散步吧！", "The quick brown fox jumps over the lazy dog.",
    "emoji 😀🚀👍🏽 and 中文 mixed", "  leading spaces\n\ttabs\nand\r\nnewlines  ", "数字 12345 + 678 = 13023。",
    "<think>\n3 + 4 = 7\n</think>\n<answer>\n7\n</answer>", "日本語と한국어도 OK", "",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_reply_tags_survive_skip_special_tokens_and_reserved_tokens_do_not(tok):
    text = "".join(f"{t}x" for t in TAGS)
    ids = tok.encode(text + "<|reserved_3|><|im_end|>", add_special_tokens=False)
    assert len(ids) == 2 * len(TAGS) + 2
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_chat_template_renders_chatml(tok):
    msgs = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "1+1=?"},
            {"role": "assistant", "content": "2"}]
    expected = ("<|im_start|>system\n你是助手。<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                "<|im_start|>assistant\n你好！<|im_end|>\n<|im_start|>user\n1+1=?<|im_end|>\n"
                "<|im_start|>assistant\n2<|im_end|>\n")
    assert tok.apply_chat_template(msgs, tokenize=False) == expected
    prompt = tok.apply_chat_template(msgs[:4], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\n1+1=?<|im_end|>\n<|im_start|>assistant\n")
    # no default system prompt is injected
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_config_files_are_consistent():
    with open(os.path.join(ROOT, "model", "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>"
    assert cfg["pad_token"] == cfg["unk_token"] == "<|endoftext|>"
    assert cfg["chat_template"] == train_tokenizer.CHAT_TEMPLATE


def test_training_is_deterministic_and_streams_with_sampling(tmp_path):
    corpus = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": f"第{i}行：今天学习了{i % 7}个新词。Line {i} of the corpus."}, ensure_ascii=False) for i in range(400)]
    corpus.write_text("\n".join(lines[:200]) + "\n\n" + "\n".join(lines[200:]) + "\n", encoding="utf-8")
    a = list(train_tokenizer.iter_texts(str(corpus), max_lines=50, sample_rate=0.5, seed=1))
    b = list(train_tokenizer.iter_texts(str(corpus), max_lines=50, sample_rate=0.5, seed=1))
    assert a == b and len(a) == 50
    t1 = train_tokenizer.train(iter(a), vocab_size=400).to_str()
    t2 = train_tokenizer.train(iter(b), vocab_size=400).to_str()
    assert t1 == t2


def test_bad_corpus_line_is_reported(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(train_tokenizer.CorpusError, match=r"c\.jsonl:2: "):
        list(train_tokenizer.iter_texts(str(corpus)))
    stats = {}
    assert list(train_tokenizer.iter_texts(str(corpus), skip_bad_lines=True, stats=stats)) == ["ok"]
    assert stats == {"kept": 1, "skipped": 1}


def test_shipped_tokenizer_is_what_the_documented_command_produces(tmp_path):
    """build_demo_data.py (pretrain only) + train_tokenizer.py into tmp dirs must give model/ byte for byte
    (about 10 s: the demo corpus is ~2 MB)."""
    from dataset.build_demo_data import build
    data = tmp_path / "demo"
    build(str(data), stages=["pretrain"], verbose=False)
    with open(data / "pretrain_hq.jsonl", "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SHIPPED_CORPUS_SHA256:
        if platform.python_version() != SHIPPED_WITH_PYTHON:
            pytest.skip(f"demo corpus differs on Python {platform.python_version()} (pydoc_data); "
                        f"the shipped tokenizer was trained on Python {SHIPPED_WITH_PYTHON}")
        pytest.fail("the demo pretrain corpus changed: rerun `python dataset/build_demo_data.py && python "
                    "train_tokenizer.py --data_path dataset/demo/pretrain_hq.jsonl`, commit model/tokenizer*.json "
                    "and update SHIPPED_CORPUS_SHA256")
    out = tmp_path / "tok"
    subprocess.run([sys.executable, os.path.join(ROOT, "train_tokenizer.py"), "--data_path", str(data / "pretrain_hq.jsonl"),
                    "--out_dir", str(out)], check=True, cwd=ROOT, capture_output=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(out / name, "rb") as f, open(os.path.join(ROOT, "model", name), "rb") as g:
            assert f.read() == g.read(), f"model/{name} differs from what train_tokenizer.py produces"


# ----------------------------------------------------------------------------------------------------
# The chat template: tools, tool calls, tool results, reasoning_content, thinking on/off
# ----------------------------------------------------------------------------------------------------
CALC = {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                         "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                                        "required": ["expression"]}}}
TOOLS_BLOCK = ("# Tools\n\nYou may call these functions:\n<tools>\n" + json.dumps(CALC, ensure_ascii=False) + "\n</tools>\n\n"
               "To call one, reply with:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
               "</tool_call><|im_end|>\n")


def test_template_renders_tools_into_the_system_turn(tok):
    user = [{"role": "user", "content": "3*4?"}]
    assert (tok.apply_chat_template(user, tools=[CALC], tokenize=False)
            == "<|im_start|>system\n" + TOOLS_BLOCK + "<|im_start|>user\n3*4?<|im_end|>\n")
    with_system = [{"role": "system", "content": "你是助手。"}] + user
    assert (tok.apply_chat_template(with_system, tools=[CALC], tokenize=False)
            == "<|im_start|>system\n你是助手。\n\n" + TOOLS_BLOCK + "<|im_start|>user\n3*4?<|im_end|>\n")
    empty_system = [{"role": "system", "content": ""}] + user  # MiniMind-3's tool lines: tools on an empty system message
    assert (tok.apply_chat_template(empty_system, tools=[CALC], tokenize=False)
            == tok.apply_chat_template(user, tools=[CALC], tokenize=False))


def test_template_renders_tool_calls_and_grouped_tool_results(tok):
    call = lambda i, expr, as_string: {"id": f"call_{i}", "type": "function", "function": {  # noqa: E731
        "name": "calculator", "arguments": json.dumps({"expression": expr}) if as_string else {"expression": expr}}}
    msgs = [{"role": "user", "content": "3*4 and 5+6?"},
            {"role": "assistant", "content": "Let me compute.", "tool_calls": [call(1, "3*4", True), call(2, "5+6", False)]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12"},
            {"role": "tool", "tool_call_id": "call_2", "content": "11"},
            {"role": "assistant", "content": None, "tool_calls": [call(3, "12+11", True)]},
            {"role": "tool", "tool_call_id": "call_3", "content": "23"},
            {"role": "assistant", "content": "12, 11; together 23."}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>user\n3*4 and 5+6?<|im_end|>\n"
        "<|im_start|>assistant\nLet me compute.\n"
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3*4"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "5+6"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n12\n</tool_response>\n<tool_response>\n11\n</tool_response><|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "12+11"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n23\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n12, 11; together 23.<|im_end|>\n")


def test_template_renders_reasoning_content_and_thinking_switch(tok):
    q = [{"role": "user", "content": "1+1?"}]
    reply = {"role": "assistant", "content": "2", "reasoning_content": "\none plus one\n"}
    assert (tok.apply_chat_template(q + [reply], tokenize=False)
            == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n<think>\none plus one\n</think>\n2<|im_end|>\n")
    empty = {"role": "assistant", "content": "2", "reasoning_content": ""}
    assert tok.apply_chat_template(q + [empty], tokenize=False).endswith("assistant\n<think>\n\n</think>\n2<|im_end|>\n")
    head = "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    prompt = lambda **kw: tok.apply_chat_template(q, tokenize=False, add_generation_prompt=True, **kw)  # noqa: E731
    assert prompt() == head
    assert prompt(enable_thinking=True) == prompt(open_thinking=True) == head + "<think>\n"
    assert prompt(enable_thinking=False) == prompt(open_thinking=False) == head + "<think>\n\n</think>\n"
    assert prompt(enable_thinking=False, open_thinking=True) == head + "<think>\n\n</think>\n"  # the vLLM/Qwen3 name wins
    # thinking off pre-fills exactly what an assistant turn with empty reasoning starts with
    assert tok.apply_chat_template(q + [empty], tokenize=False).startswith(prompt(enable_thinking=False))
