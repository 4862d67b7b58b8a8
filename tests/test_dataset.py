"""dataset/lm_dataset.py: labels, truncation, collate, validation errors, skipping, index cache."""
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataset import lm_dataset as L  # noqa: E402
from dataset.lm_dataset import (DataFormatError, DPODataset, PretrainDataset, SFTDataset,  # noqa: E402
                                collate_fn, load_tokenizer, make_collate)

SYS_MULTI = [{"role": "system", "content": "你是一个乐于助人的助手。"},
             {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你的吗？"},
             {"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "3 + 4 = 7."}]
REASON = [{"role": "user", "content": "小明有3个苹果，又买了4个，一共几个？"},
          {"role": "assistant", "content": "<think>\n3 + 4 = 7。\n</think>\n<answer>\n7\n</answer>"}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l, ensure_ascii=False)) + "\n" for l in lines), encoding="utf-8")
    return str(path)


def labelled_spans(tok, ids, labels):
    """Decode each contiguous run of labelled tokens."""
    spans, cur = [], []
    for i, l in zip(ids.tolist(), labels.tolist()):
        if l == -100:
            if cur:
                spans.append(cur)
            cur = []
        else:
            assert l == i, "a label must equal its input id (no shift in the dataset)"
            cur.append(i)
    if cur:
        spans.append(cur)
    return [tok.decode(s) for s in spans]


@pytest.mark.parametrize("msgs", [SYS_MULTI, REASON, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""},
                                                     {"role": "user", "content": "?"}, {"role": "assistant", "content": "ok"}],
                                  [{"role": "system", "content": "你先说。"}, {"role": "assistant", "content": "我先说。"},
                                   {"role": "user", "content": "好"}, {"role": "assistant", "content": "嗯 😀"}]])
def test_sft_labels_cover_exactly_assistant_content_and_im_end(tok, tmp_path, msgs):
    ds = SFTDataset(write(tmp_path, [{"conversations": msgs}]), tok, max_length=1024)
    ids, labels = ds[0]
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape and ids.dim() == 1
    assert ids.tolist() == tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    assert labelled_spans(tok, ids, labels) == [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]


def test_sft_truncation_never_labels_prompt_tokens(tok, tmp_path):
    path = write(tmp_path, [{"conversations": SYS_MULTI}])
    full_ids, full_labels = SFTDataset(path, tok, max_length=1024)[0]
    for n in range(1, len(full_ids) + 1):
        ids, labels = SFTDataset(path, tok, max_length=n)[0]
        assert len(ids) == len(labels) == n
        assert ids.tolist() == full_ids[:n].tolist() and labels.tolist() == full_labels[:n].tolist()
    cut = SFTDataset(path, tok, max_length=len(full_ids) - 4)[0]  # ends inside the last reply
    spans = labelled_spans(tok, *cut)
    assert len(spans) == 2 and spans[0] == "你好！有什么可以帮你的吗？<|im_end|>"
    assert spans[1] and "3 + 4 = 7.<|im_end|>".startswith(spans[1]) and not spans[1].endswith("<|im_end|>")


def test_dpo_sample_and_collate(tok, tmp_path):
    chosen = SYS_MULTI
    rejected = SYS_MULTI[:-1] + [{"role": "assistant", "content": "不知道，别来烦我。"}]
    ds = DPODataset(write(tmp_path, [{"chosen": chosen, "rejected": rejected}] * 3), tok)
    s = ds[0]
    assert set(s) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    assert labelled_spans(tok, s["chosen_input_ids"], s["chosen_labels"])[-1] == "3 + 4 = 7.<|im_end|>"
    assert labelled_spans(tok, s["rejected_input_ids"], s["rejected_labels"])[-1] == "不知道，别来烦我。<|im_end|>"
    assert s["chosen_input_ids"].tolist() == tok.apply_chat_template(chosen, tokenize=True, return_dict=False)
    batch = collate_fn([ds[0], ds[1]])
    T = max(len(s["chosen_input_ids"]), len(s["rejected_input_ids"]))
    assert set(batch) == set(s) and all(v.shape == (2, T) for v in batch.values())
    n = len(s["rejected_input_ids"])
    assert (batch["rejected_labels"][:, n:] == -100).all() and (batch["rejected_input_ids"][:, n:] == 0).all()


def test_pretrain_bos_eos_truncation_and_collate_padding(tok, tmp_path):
    ds = PretrainDataset(write(tmp_path, [{"text": "你好，世界。"}, {"text": "长文本" * 200}]), tok, max_length=64)
    ids, labels = ds[0]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert torch.equal(ids, labels)
    assert tok.decode(ids[1:-1]) == "你好，世界。"
    long_ids, _ = ds[1]
    assert len(long_ids) == 64 and long_ids[0] == tok.bos_token_id and long_ids[-1] != tok.eos_token_id
    x, y = collate_fn([ds[0], ds[1]])
    assert x.shape == y.shape == (2, 64)
    n = len(ids)
    assert (x[0, n:] == 0).all() and (y[0, n:] == -100).all()  # padding carries no loss
    assert (y != -100).sum() == n + 64


def test_make_collate_options():
    a, b = torch.arange(1, 6), torch.arange(1, 12)
    x, y = make_collate(pad_to_multiple_of=8)([(a, a), (b, b)])
    assert x.shape == (2, 16) and (y[0, 5:] == -100).all()
    x, y = make_collate(max_length=8)([(a, a), (b, b)])
    assert x.shape == (2, 8) and x[1].tolist() == list(range(1, 9))
    x, _ = make_collate(pad_to_multiple_of=16, max_length=16)([(a, a)])
    assert x.shape == (1, 16)  # fixed shapes
    x, _ = make_collate(pad_id=7)([(a, a), (b, b)])
    assert (x[0, 5:] == 7).all()


BAD_CASES = [  # (dataset class, lines, line number in the error, text in the error)
    (PretrainDataset, ['{"text": "ok"}', '{"text": "a" "b"}'], 2, "invalid JSON (Expecting ',' delimiter"),
    (PretrainDataset, ['{"text": "ok"}', '', '{"txt": "a"}'], 3, 'no "text" key'),
    (PretrainDataset, [{"conversations": REASON}], 1, "looks like SFT/LoRA/reasoning data"),
    (PretrainDataset, [{"chosen": REASON, "rejected": REASON}], 1, "looks like DPO data"),
    (PretrainDataset, ['{"text": 5}'], 1, '"text" is int, not a string'),
    (PretrainDataset, ['["text"]'], 1, "not an object"),
    (SFTDataset, [{"text": "plain prose"}], 1, "looks like pretrain data"),
    (SFTDataset, ["{", '  "conversations": [', "  ]", "}"], 1, "needs each JSON object on one line"),  # pretty-printed
    (SFTDataset, [{"chosen": REASON, "rejected": REASON}], 1, "looks like DPO data"),
    (SFTDataset, [{"conversations": REASON}, {"conversations": {"role": "user"}}], 2, "not a list of messages"),
    (SFTDataset, [{"conversations": [{"content": "hi"}, REASON[1]]}], 1, 'message 1 has no "role"'),
    (SFTDataset, [{"conversations": [REASON[0], {"role": "assistant"}]}], 1, 'message 2 has no "content"'),
    (SFTDataset, [{"conversations": [{"role": "function", "content": "x"}, REASON[1]]}], 1, 'unknown role "function"'),
    (SFTDataset, [{"conversations": [REASON[0], {"role": "assistant", "content": None}]}], 1, "NoneType, not a string"),
    (SFTDataset, [{"conversations": [REASON[0]]}], 1, "no assistant message"),
    (SFTDataset, [{"conversations": [REASON[1], REASON[0], REASON[1]]}], 1, "starts with an assistant message"),
    (SFTDataset, [{"conversations": []}], 1, "empty list"),
    (DPODataset, [{"conversations": REASON}], 1, "looks like SFT/LoRA/reasoning data"),
    (DPODataset, [{"chosen": REASON}], 1, 'no "rejected" key'),
    (DPODataset, [{"chosen": REASON, "rejected": "bad"}], 1, '"rejected" is str'),
    (PretrainDataset, [], 1, "no records"),
    (SFTDataset, ["", "   ", ""], 1, "no records"),
]


@pytest.mark.parametrize("cls,lines,lineno,text", BAD_CASES)
def test_bad_input_raises_one_line_error_with_line_number(tok, tmp_path, cls, lines, lineno, text):
    path = write(tmp_path, lines)
    with pytest.raises(DataFormatError) as e:
        cls(path, tok)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert msg.startswith(f"{path}:{lineno}: ") and text in msg and "\n" not in msg, msg


def test_invalid_utf8_is_reported(tok, tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataFormatError, match=r"bin\.jsonl:2: not valid UTF-8"):
        PretrainDataset(str(path), tok)


def test_skip_bad_lines_counts_and_warns_once(tok, tmp_path, capsys):
    lines = [{"conversations": REASON}, "{broken", "", {"conversations": [REASON[0]]}, {"conversations": SYS_MULTI}, '{"text": "x"}']
    ds = SFTDataset(write(tmp_path, lines), tok, skip_bad_lines=True)
    assert len(ds) == 2 and ds.skipped == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped 3 bad line(s)" in err and "data.jsonl:2:" in err
    assert labelled_spans(tok, *ds[1])[-1] == "3 + 4 = 7.<|im_end|>"
    with pytest.raises(DataFormatError, match="all 2 non-blank lines are bad"):
        SFTDataset(write(tmp_path, ["{", "[]"], "allbad.jsonl"), tok, skip_bad_lines=True)


def test_blank_lines_bom_crlf_and_offsets(tok, tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n\r\n   \n{"text": "two"}\r\n{"text": "three"}')  # no final newline
    ds = PretrainDataset(str(path), tok)
    assert ds.offsets.dtype == np.int64 and len(ds) == 3
    assert [tok.decode(ds[i][0][1:-1]) for i in range(3)] == ["one", "two", "three"]


def test_index_cache_is_used_and_invalidated(tok, tmp_path, monkeypatch):
    path = write(tmp_path, [{"text": "a"}, {"text": "b"}])
    ds = PretrainDataset(path, tok, cache_index=True)
    assert os.path.exists(path + ".pretrain.idx.npz")

    def boom(*a, **k):
        raise AssertionError("should have used the cache")
    monkeypatch.setattr(L, "scan", boom)
    assert np.array_equal(PretrainDataset(path, tok, cache_index=True).offsets, ds.offsets)
    monkeypatch.undo()
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"text": "c"}\n')
    assert len(PretrainDataset(path, tok, cache_index=True)) == 3  # size changed -> rescanned
    # a cache written in skip mode still fails a strict run
    with open(path, "a", encoding="utf-8") as f:
        f.write("{bad\n")
    assert len(PretrainDataset(path, tok, skip_bad_lines=True, cache_index=True)) == 3
    with pytest.raises(DataFormatError, match=r":4: invalid JSON"):
        PretrainDataset(path, tok, cache_index=True)


def test_works_in_dataloader_workers_and_pickles(tok, tmp_path):
    path = write(tmp_path, [{"conversations": REASON}] * 4 + [{"conversations": SYS_MULTI}] * 4)
    ds = SFTDataset(path, tok, max_length=64)
    ds[0]  # opens a handle in this process; pickling must drop it
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[5][0], ds[5][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_fn)
    batches = list(loader)
    assert len(batches) == 2 and batches[1][0].shape[0] == 4


# ----------------------------------------------------------------------------------------------------
# Tool use, reasoning_content, and labels derived from the tokenizer's own chat template
# ----------------------------------------------------------------------------------------------------
CALC = {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                         "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}
TOOL_CONV = [  # MiniMind-3's shape: tools and tool_calls as JSON strings
    {"role": "system", "content": "你是助手。", "tools": json.dumps([CALC], ensure_ascii=False)},
    {"role": "user", "content": "3乘4是多少？"},
    {"role": "assistant", "content": "", "tool_calls": json.dumps([{"id": "c1", "type": "function", "function": {
        "name": "calculator", "arguments": json.dumps({"expression": "3*4"})}}])},
    {"role": "tool", "tool_call_id": "c1", "content": "12"},
    {"role": "assistant", "content": "3乘4等于12。", "reasoning_content": "用计算器算出12。"},
]
TOOL_CALL_TEXT = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3*4"}}\n</tool_call>'


def test_tool_conversation_labels_are_exactly_what_the_assistant_writes(tok, tmp_path):
    ds = SFTDataset(write(tmp_path, [{"conversations": TOOL_CONV}]), tok, max_length=1024)
    ids, labels = ds[0]
    assert labelled_spans(tok, ids, labels) == [TOOL_CALL_TEXT + "<|im_end|>",
                                                "<think>\n用计算器算出12。\n</think>\n3乘4等于12。<|im_end|>"]
    messages = [dict(TOOL_CONV[0], tools=None), *TOOL_CONV[1:]]
    messages[0].pop("tools")
    messages[2] = dict(messages[2], tool_calls=json.loads(messages[2]["tool_calls"]))
    rendered = tok.apply_chat_template(messages, tools=[CALC], tokenize=False)
    assert tok.decode(ids) == rendered and ids.tolist() == tok.encode(rendered, add_special_tokens=False)
    # the tool's result, the schemas, the system and user text carry no label
    unlabelled = tok.decode([i for i, l in zip(ids.tolist(), labels.tolist()) if l == -100])
    assert "<tool_response>\n12\n</tool_response>" in unlabelled and '"name": "calculator", "description"' in unlabelled


def test_tools_given_as_objects_or_on_the_line_give_the_same_sample(tok, tmp_path):
    as_objects = [dict(TOOL_CONV[0], tools=[CALC]), TOOL_CONV[1],
                  dict(TOOL_CONV[2], tool_calls=[{"name": "calculator", "arguments": {"expression": "3*4"}}]), *TOOL_CONV[3:]]
    on_line = {"tools": [CALC], "conversations": [{"role": "system", "content": "你是助手。"}, *as_objects[1:]]}
    base = SFTDataset(write(tmp_path, [{"conversations": TOOL_CONV}], "a.jsonl"), tok)[0]
    for i, line in enumerate([{"conversations": as_objects}, on_line]):
        ids, labels = SFTDataset(write(tmp_path, [line], f"b{i}.jsonl"), tok)[0]
        assert torch.equal(ids, base[0]) and torch.equal(labels, base[1])


def test_minimind3_exports_with_every_field_on_every_message_read_the_same(tok, tmp_path):
    """An export that gives every message all of MiniMind-3's fields (role, content, reasoning_content, tools,
    tool_calls), the unused ones null or "", trains exactly like the plain line."""
    fields = ("reasoning_content", "tools", "tool_calls")
    padded = [{**{k: ("" if i % 2 else None) for k in fields}, **m} for i, m in enumerate(TOOL_CONV)]
    assert padded[1] == {**TOOL_CONV[1], "reasoning_content": "", "tools": "", "tool_calls": ""}
    base = SFTDataset(write(tmp_path, [{"conversations": TOOL_CONV}], "a.jsonl"), tok)[0]
    ids, labels = SFTDataset(write(tmp_path, [{"conversations": padded}], "b.jsonl"), tok)[0]
    assert torch.equal(ids, base[0]) and torch.equal(labels, base[1])


def _with_template(tmp_path, template, name):
    """A copy of the shipped tokenizer with another chat template (nothing downloaded)."""
    import shutil
    d = tmp_path / name
    shutil.copytree(os.path.join(ROOT, "model"), d, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return load_tokenizer(str(d))


# MiniMind2's shape: ChatML that adds a default system prompt when the conversation has none.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# MiniMind-3's shape: every assistant turn has a think block; the generation prompt pre-fills an empty one
# unless open_thinking is set.
THINK_BLOCK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n<think>\n"
    "{{ (m['reasoning_content'] or '').strip() }}\n</think>\n\n{{ m['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if open_thinking is defined and open_thinking %}<think>\n"
    "{% else %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


@pytest.mark.parametrize("template", [None, DEFAULT_SYSTEM_TEMPLATE, THINK_BLOCK_TEMPLATE])
def test_training_prompt_equals_inference_prompt(tok, tmp_path, template):
    """Every assistant turn is trained after exactly the ids inference feeds the model for that history
    (eval_model.py, the server: apply_chat_template(..., add_generation_prompt=True))."""
    t = tok if template is None else _with_template(tmp_path, template, "tok")
    convs = [SYS_MULTI[1:], SYS_MULTI, REASON,
             [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2", "reasoning_content": "one and one"},
              {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": ""}]]
    path = write(tmp_path, [{"conversations": c} for c in convs])
    ds = SFTDataset(path, t, max_length=1024)
    for c, (ids, labels) in zip(convs, (ds[i] for i in range(len(convs)))):
        starts = [j for j in range(1, len(labels)) if labels[j] != -100 and labels[j - 1] == -100]
        turns = [j for j, m in enumerate(c) if m["role"] == "assistant"]
        assert len(starts) == len(turns)
        for start, j in zip(starts, turns):
            rc = c[j].get("reasoning_content")
            kw = ({"open_thinking": False, "enable_thinking": False} if rc == "" else
                  {"open_thinking": True, "enable_thinking": True} if rc and template else {})
            prompt = t.apply_chat_template(c[:j], tokenize=True, add_generation_prompt=True, return_dict=False, **kw)
            assert ids[:start].tolist() == prompt
        if template == DEFAULT_SYSTEM_TEMPLATE and c[0]["role"] != "system":
            assert t.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user")


TOOL_BAD_CASES = [
    ([dict(TOOL_CONV[0], tools="[{broken"), *TOOL_CONV[1:]], 'message 1 tools is a string but not valid JSON'),
    ([TOOL_CONV[0], TOOL_CONV[1], dict(TOOL_CONV[2], tool_calls='[{"function": {"name": "calculator", "arguments": "{3*4"}}]'),
      *TOOL_CONV[3:]], "message 3 tool_calls call 1 arguments is a string but not valid JSON"),
    ([TOOL_CONV[0], TOOL_CONV[1], dict(TOOL_CONV[2], tool_calls=[{"function": {"arguments": "{}"}}]), *TOOL_CONV[3:]],
     'call 1 needs "name" and "arguments"'),
    ([TOOL_CONV[0], TOOL_CONV[1], dict(TOOL_CONV[2], tool_calls='[{"name": "calculator", "arguments": "[1, 2]"}]'),
      *TOOL_CONV[3:]], "arguments must be a JSON object, got list"),
    ([dict(TOOL_CONV[0], tools=json.dumps({"name": "x"})), *TOOL_CONV[1:]], "must be a list of function schemas"),
    ([*TOOL_CONV[:4], dict(TOOL_CONV[4], reasoning_content=["a"])], '"reasoning_content" is list, not a string'),
    ([TOOL_CONV[1], dict(TOOL_CONV[4], weight=0.5)], 'has field(s) "weight" that chat training does not use'),
    ([dict(TOOL_CONV[1], tool_calls=[]), TOOL_CONV[4]], 'has field(s) "tool_calls" that chat training does not use'),
]


@pytest.mark.parametrize("conv,text", TOOL_BAD_CASES)
def test_bad_tool_and_field_data_is_a_one_line_error(tok, tmp_path, conv, text):
    path = write(tmp_path, [{"conversations": TOOL_CONV}, {"conversations": conv}])
    with pytest.raises(DataFormatError) as e:
        SFTDataset(path, tok)
    assert str(e.value).startswith(f"{path}:2: ") and text in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("line,text", [
    ({"conversations": [REASON[0], {"role": "assistant", "content": "空"}]}, "looks like RL-prompt data"),
    ({"conversations": [REASON[0], {"role": "assistant", "content": ""}]}, "looks like RL-prompt data"),
    ({"conversations": REASON, "gt": ["7"]}, "looks like RL-prompt data"),
    ({"conversations": REASON, "id": 17}, r'field\(s\) "id" beside "conversations" are not used'),
])
def test_rl_prompt_files_and_unused_fields_are_refused_by_sft(tok, tmp_path, line, text):
    with pytest.raises(DataFormatError, match=text):
        SFTDataset(write(tmp_path, [line]), tok)


def test_dpo_refuses_unused_fields(tok, tmp_path):
    with pytest.raises(DataFormatError, match=r':1: field\(s\) "score" beside "chosen" and "rejected"'):
        DPODataset(write(tmp_path, [{"chosen": REASON, "rejected": REASON, "score": 1}]), tok)


def test_thinking_off_turn_learns_the_answer_after_the_prefilled_empty_think_block(tok, tmp_path):
    conv = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<answer>\n2\n</answer>", "reasoning_content": ""}]
    ids, labels = SFTDataset(write(tmp_path, [{"conversations": conv}]), tok)[0]
    assert labelled_spans(tok, ids, labels) == ["<answer>\n2\n</answer><|im_end|>"]
    start = next(i for i, l in enumerate(labels.tolist()) if l != -100)
    assert ids[:start].tolist() == tok.apply_chat_template(conv[:1], add_generation_prompt=True, enable_thinking=False,
                                                           tokenize=True, return_dict=False)


def test_encode_plain_gives_the_tokenizers_own_ids(tok):
    """Datasets encode through the tokenizers library directly (faster); the ids must be tokenizer.encode's, special
    token strings inside the text included, also after a call that left truncation set on the backend."""
    from dataset.lm_dataset import encode_plain
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        texts = [p for p in f.read().split("\n\n") if p.strip()][:300]  # English, Chinese, code, tables
    texts += ["<|im_start|>user\nhi<|im_end|>", " leading", "trailing  ", "\n\n", "", "a<think>b</think>", "😀\u200b", "<|endoftext|>"]
    assert all(encode_plain(tok, t) == tok.encode(t, add_special_tokens=False) for t in texts)
    long_text = texts[0] * 5
    full = tok.encode(long_text, add_special_tokens=False)
    assert len(tok(long_text, truncation=True, max_length=3)["input_ids"]) == 3  # leaves truncation set on the backend
    assert encode_plain(tok, long_text) == full and encode_plain(tok, long_text) == full
