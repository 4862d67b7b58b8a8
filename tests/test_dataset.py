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


@pytest.mark.parametrize("msgs", [SYS_MULTI, REASON, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
                                  [{"role": "assistant", "content": "我先说。"}, {"role": "user", "content": "好"},
                                   {"role": "assistant", "content": "嗯 😀"}]])
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
    (SFTDataset, [{"chosen": REASON, "rejected": REASON}], 1, "looks like DPO data"),
    (SFTDataset, [{"conversations": REASON}, {"conversations": {"role": "user"}}], 2, "not a list of messages"),
    (SFTDataset, [{"conversations": [{"content": "hi"}, REASON[1]]}], 1, 'message 1 has no "role"'),
    (SFTDataset, [{"conversations": [REASON[0], {"role": "assistant"}]}], 1, 'message 2 has no "content"'),
    (SFTDataset, [{"conversations": [{"role": "tool", "content": "x"}, REASON[1]]}], 1, 'unknown role "tool"'),
    (SFTDataset, [{"conversations": [REASON[0], {"role": "assistant", "content": None}]}], 1, "NoneType, not a string"),
    (SFTDataset, [{"conversations": [REASON[0]]}], 1, "no assistant message"),
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
