"""Data inputs beyond jsonl: parquet files / folders / globs and datasets' save_to_disk folders (through
`datasets`), --text_column, the token shards of scripts/prepare_data.py, the tokenizer fingerprint, progress bars."""
import io
import json
import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script
from dataset.lm_dataset import DataFormatError, DPODataset, PretrainDataset, SFTDataset, collate_fn, load_tokenizer
from trainer.tokenizer_fingerprint import tokenizer_fingerprint
from dataset.token_shards import TokenShardDataset
from test_dataset import REASON, SYS_MULTI, TOOL_CONV

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TINY_FLAGS = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--device", "cpu",
              "--num_workers", "0", "--log_interval", "1", "--max_seq_len", "48", "--batch_size", "4"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """load_dataset converts parquet into an Arrow cache: keep it out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


# ----------------------------------------------------------------------------------------------------
# the same rows in every input form

CALC = {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                         "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                                        "required": ["expression"]}}}
DATES = {"type": "function", "function": {"name": "add_days",
                                          "parameters": {"type": "object", "properties": {"date": {"type": "string"},
                                                                                          "days": {"type": "integer"}}}}}


def tool_conv(tool, args, result, answer):
    """A tool conversation with tools and tool_calls as objects: Arrow stores them as structs, so every message,
    tool and argument object of a column gets every field any of them has (null where absent)."""
    return [{"role": "system", "content": "你是助手。", "tools": [tool]},
            {"role": "user", "content": "帮我算一下。"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": tool["function"]["name"], "arguments": args}}]},
            {"role": "tool", "content": result},
            {"role": "assistant", "content": answer, "reasoning_content": "工具给出了结果。"}]


PRETRAIN_ROWS = [{"text": "你好，世界。 Hello, world!"}, {"text": "长文本" * 40, "id": 7}, {"text": "  spaces  \n"},
                 {"text": "第四行：😀 emoji and English."}, {"text": "五"}]
SFT_OBJECT_ROWS = [{"conversations": SYS_MULTI}, {"conversations": REASON},
                   {"conversations": tool_conv(CALC, {"expression": "3*4"}, "12", "3乘4等于12。")},
                   {"conversations": tool_conv(DATES, {"date": "2024-01-30", "days": 3}, "2024-02-02", "是2月2日。")},
                   {"conversations": SYS_MULTI[1:3], "tools": [CALC]}]
SFT_STRING_ROWS = [{"conversations": TOOL_CONV}, {"conversations": SYS_MULTI}, {"conversations": REASON}]
DPO_ROWS = [{"chosen": SYS_MULTI, "rejected": SYS_MULTI[:-1] + [{"role": "assistant", "content": "不知道。"}]},
            {"chosen": REASON, "rejected": [REASON[0], {"role": "assistant", "content": "八个。"}]}]
STAGES = {"pretrain": (PretrainDataset, PRETRAIN_ROWS), "sft_objects": (SFTDataset, SFT_OBJECT_ROWS),
          "sft_strings": (SFTDataset, SFT_STRING_ROWS), "dpo": (DPODataset, DPO_ROWS)}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def arrow_table(rows):
    """Rows as pyarrow builds them (what pandas / pyarrow writers publish): nested objects become structs."""
    return pa.Table.from_struct_array(pa.array(rows))


def write_parquet_folder(folder, rows, split=2):
    """The rows in two parquet files, the second in a subfolder (hub repos keep them under data/)."""
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    table = arrow_table(rows)
    files = [os.path.join(folder, "a-0.parquet"), os.path.join(folder, "data", "b-1.parquet")]
    pq.write_table(table.slice(0, split), files[0])
    pq.write_table(table.slice(split), files[1])
    return str(folder), files


def every_input(tmp_path, rows):
    """{form: path} of the same rows as jsonl, pyarrow parquet (one file, a folder, a glob), parquet written by
    datasets, and save_to_disk folders (a Dataset and a DatasetDict)."""
    d = str(tmp_path)
    jsonl = write_jsonl(os.path.join(d, "rows.jsonl"), rows)
    folder, files = write_parquet_folder(os.path.join(d, "pq"), rows)
    pq.write_table(arrow_table(rows), os.path.join(d, "one.parquet"))
    by_datasets = datasets.load_dataset("json", data_files=jsonl, split="train")
    by_datasets.to_parquet(os.path.join(d, "by_datasets.parquet"))
    by_datasets.save_to_disk(os.path.join(d, "saved"))
    datasets.DatasetDict({"train": datasets.Dataset(arrow_table(rows))}).save_to_disk(os.path.join(d, "saved_dict"))
    return {"jsonl": jsonl, "parquet": os.path.join(d, "one.parquet"), "parquet_folder": folder,
            "glob": os.path.join(d, "pq", "**", "*.parquet"), "datasets_parquet": os.path.join(d, "by_datasets.parquet"),
            "saved": os.path.join(d, "saved"), "saved_dict": os.path.join(d, "saved_dict")}


def same_sample(a, b):
    if isinstance(a, dict):
        return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("stage", list(STAGES))
def test_same_rows_give_identical_samples_and_labels_in_every_input(tok, tmp_path, stage):
    cls, rows = STAGES[stage]
    paths = every_input(tmp_path, rows)
    base = cls(paths.pop("jsonl"), tok, max_length=4096)
    assert len(base) == len(rows)
    for form, path in paths.items():
        ds = cls(path, tok, max_length=4096)
        assert len(ds) == len(rows), form
        for i in range(len(rows)):
            assert same_sample(ds[i], base[i]), (form, i)
    if stage == "sft_objects":  # the struct case did happen: a message read raw from Arrow has null fields
        raw = cls(paths["parquet"], tok).source.table[3]["conversations"][1]
        assert None in raw.values() and "tool_calls" in raw


def test_truncation_is_the_same_for_arrow_rows(tok, tmp_path):
    paths = every_input(tmp_path, SFT_OBJECT_ROWS)
    for n in (8, 40):
        a, b = SFTDataset(paths["jsonl"], tok, max_length=n), SFTDataset(paths["parquet_folder"], tok, max_length=n)
        assert all(same_sample(a[i], b[i]) and len(a[i][0]) <= n for i in range(len(a)))


# ----------------------------------------------------------------------------------------------------
# validation: the same checks, one line naming the file and the row

BAD_ROWS = [  # (dataset, rows with the bad one at index 3, text in the error)
    (PretrainDataset, PRETRAIN_ROWS[:3] + [{"text": "   "}] + PRETRAIN_ROWS[3:], '"text" is empty'),
    (SFTDataset, SFT_OBJECT_ROWS[:3] + [{"conversations": [{"role": "narrator", "content": "x"}]}] + SFT_OBJECT_ROWS[3:],
     'message 1 has unknown role "narrator"'),
    (SFTDataset, SFT_OBJECT_ROWS[:3] + [{"conversations": [REASON[0]]}] + SFT_OBJECT_ROWS[3:], "no assistant message"),
    (DPODataset, DPO_ROWS + [DPO_ROWS[0], {"chosen": REASON, "rejected": []}], '"rejected" is an empty list'),
]


@pytest.mark.parametrize("cls,rows,text", BAD_ROWS)
def test_bad_row_is_a_one_line_error_naming_file_and_row(tok, tmp_path, cls, rows, text):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataFormatError) as e:
        cls(jsonl, tok)
    jsonl_problem = str(e.value).split(":4: ", 1)[1]
    folder, files = write_parquet_folder(tmp_path / "pq", rows)  # row 3 is row 1 of the second file
    datasets.load_dataset("json", data_files=jsonl, split="train").save_to_disk(str(tmp_path / "saved"))
    for path, where in [(folder, f"{files[1]}: row 1: "), (str(tmp_path / "saved"), f"{tmp_path / 'saved'}: row 3: ")]:
        with pytest.raises(DataFormatError) as e:
            cls(path, tok)
        msg = str(e.value)
        assert msg.startswith(where) and "\n" not in msg and text in msg, msg
        assert msg[len(where):] == jsonl_problem  # the same check, the same words


def test_skip_bad_rows_counts_and_keeps_the_rest(tok, tmp_path, capsys):
    rows = PRETRAIN_ROWS[:2] + [{"text": ""}] + PRETRAIN_ROWS[2:] + [{"text": " "}]
    folder, files = write_parquet_folder(tmp_path / "pq", rows, split=3)
    ds = PretrainDataset(folder, tok, skip_bad_lines=True)
    err = capsys.readouterr().err
    assert ds.skipped == 2 and len(ds) == len(PRETRAIN_ROWS)
    assert err.count("\n") == 1 and "skipped 2 bad row(s)" in err and f"{files[0]}: row 2:" in err
    base = PretrainDataset(write_jsonl(tmp_path / "good.jsonl", PRETRAIN_ROWS), tok)
    assert all(same_sample(ds[i], base[i]) for i in range(len(base)))
    with pytest.raises(DataFormatError, match="all 2 rows are bad"):
        PretrainDataset(write_parquet_folder(tmp_path / "bad", [{"text": ""}, {"text": " "}], split=1)[0], tok, skip_bad_lines=True)


def test_text_and_conversations_columns(tok, tmp_path):
    base = PretrainDataset(write_jsonl(tmp_path / "a.jsonl", PRETRAIN_ROWS), tok)
    renamed = [{"content": r["text"], "url": "x"} for r in PRETRAIN_ROWS]
    pq.write_table(arrow_table(renamed), tmp_path / "content.parquet")
    for path in (write_jsonl(tmp_path / "content.jsonl", renamed), str(tmp_path / "content.parquet")):
        ds = PretrainDataset(path, tok, text_column="content")
        assert all(same_sample(ds[i], base[i]) for i in range(len(base)))
        with pytest.raises(DataFormatError, match=r'no "body" key \(named by --text_column'):
            PretrainDataset(path, tok, text_column="body")
    sft = SFTDataset(write_jsonl(tmp_path / "s.jsonl", SFT_STRING_ROWS), tok)
    messages = [{"messages": r["conversations"]} for r in SFT_STRING_ROWS]
    ds = SFTDataset(write_jsonl(tmp_path / "m.jsonl", messages), tok, conversations_column="messages")
    assert all(same_sample(ds[i], sft[i]) for i in range(len(sft)))
    # without the flag, the error names it, and the column when only one has the right type
    with pytest.raises(DataFormatError, match=r"pass --conversations_column messages\."):
        SFTDataset(str(tmp_path / "m.jsonl"), tok)
    with pytest.raises(DataFormatError, match=r"pass --text_column NAME\."):  # "content" and "url" are both strings
        PretrainDataset(str(tmp_path / "content.jsonl"), tok)


def test_input_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="no files match"):
        PretrainDataset(str(tmp_path / "none-*.parquet"), tok)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no .parquet files in this folder"):
        PretrainDataset(str(tmp_path / "empty_dir"), tok)
    with pytest.raises(FileNotFoundError, match="data file not found"):
        PretrainDataset(str(tmp_path / "missing.parquet"), tok)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataFormatError, match="junk.parquet: cannot read it as parquet"):
        PretrainDataset(str(tmp_path / "junk.parquet"), tok)
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(DataFormatError, match="empty.parquet: no rows"):
        PretrainDataset(str(tmp_path / "empty.parquet"), tok)
    write_jsonl(tmp_path / "mixed-1.jsonl", PRETRAIN_ROWS)
    pq.write_table(arrow_table(PRETRAIN_ROWS), tmp_path / "mixed-2.parquet")
    with pytest.raises(DataFormatError, match="mixed-1.jsonl, which is not a .parquet file"):
        PretrainDataset(str(tmp_path / "mixed-*"), tok)
    table = datasets.Dataset(arrow_table(PRETRAIN_ROWS))
    datasets.DatasetDict({"a": table, "b": table}).save_to_disk(str(tmp_path / "two_splits"))
    with pytest.raises(DataFormatError, match='splits a, b and no "train" split'):
        PretrainDataset(str(tmp_path / "two_splits"), tok)
    pq.write_table(arrow_table(SFT_STRING_ROWS), tmp_path / "sft.parquet")
    with pytest.raises(DataFormatError, match="sft.parquet: row 0: .* looks like SFT"):  # the wrong stage's file
        PretrainDataset(str(tmp_path / "sft.parquet"), tok)


def test_arrow_dataset_in_dataloader_workers(tok, tmp_path):
    paths = every_input(tmp_path, SFT_OBJECT_ROWS * 2)
    ds = SFTDataset(paths["saved"], tok, max_length=64)
    clone = pickle.loads(pickle.dumps(ds))
    assert same_sample(clone[5], ds[5])
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate_fn)
    assert [b[0].shape[0] for b in loader] == [5, 5]


# ----------------------------------------------------------------------------------------------------
# token shards (scripts/prepare_data.py) and the tokenizer fingerprint


def run(script, *flags):
    return run_script(script, *flags)


def one_line_error(proc, *needles):
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def corpus_rows(n=120):
    return [{"text": f"第{i}段。" + "人民日报报道，经济持续增长。 The quick brown fox. " * (1 + i % 7)} for i in range(n)]


def other_tokenizer(tmp_path):
    """The shipped tokenizer with one more token: same vocabulary otherwise, another fingerprint."""
    d = tmp_path / "other_tok"
    shutil.copytree(os.path.join(ROOT, "model"), d, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    other = load_tokenizer(str(d))
    other.add_tokens(["<extra_token>"])
    other.save_pretrained(str(d))
    return str(d)


def test_tokenizer_fingerprint(tok, tmp_path):
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(load_tokenizer())  # stable across loads
    tok(["a b c"] * 2, truncation=True, max_length=2, padding=True)  # call settings do not change it
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(load_tokenizer())
    assert tokenizer_fingerprint(load_tokenizer(other_tokenizer(tmp_path))) != tokenizer_fingerprint(tok)


def test_prepare_data_shards_round_trip_exactly(tok, tmp_path):
    rows = corpus_rows()
    jsonl = write_jsonl(tmp_path / "corpus.jsonl", rows[:57] + ["", '{"text": "  "}'] + rows[57:])
    out = str(tmp_path / "shards")
    proc = run("scripts/prepare_data.py", "--data_path", jsonl, "--out_dir", out, "--num_proc", "2",
               "--shard_tokens", "2000", "--skip_bad_lines", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr  # no progress bar in a log
    index = json.load(open(os.path.join(out, "index.json")))
    assert index["docs"] == len(rows) and index["skipped"] == 1 and len(index["shards"]) > 3
    assert index["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    corpus, shards = PretrainDataset(jsonl, tok, max_length=None, skip_bad_lines=True), TokenShardDataset(out, tok)
    assert len(shards) == len(corpus) == len(rows)
    assert sum(s["num_tokens"] for s in index["shards"]) == index["tokens"] == sum(len(corpus.tokens(i)) for i in range(len(rows)))
    for i in range(len(rows)):
        assert shards.tokens(i).dtype == np.uint16 and shards.tokens(i).tolist() == corpus.tokens(i)
    for n in (16, 512):
        a, b = PretrainDataset(jsonl, tok, max_length=n, skip_bad_lines=True), TokenShardDataset(out, tok, max_length=n)
        assert all(same_sample(a[i], b[i]) for i in range(len(rows)))
    # from parquet with another column name, in one process: the same shards
    pq.write_table(arrow_table([{"body": r["text"]} for r in rows]), tmp_path / "corpus.parquet")
    proc = run("scripts/prepare_data.py", "--data_path", str(tmp_path / "corpus.parquet"), "--text_column", "body",
               "--out_dir", str(tmp_path / "from_parquet"), "--num_proc", "1", "--shard_tokens", "2000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = TokenShardDataset(str(tmp_path / "from_parquet"), tok)
    assert all(np.array_equal(again.tokens(i), shards.tokens(i)) for i in range(len(rows)))
    loader = torch.utils.data.DataLoader(shards, batch_size=8, num_workers=2, collate_fn=collate_fn)
    assert sum(b[0].shape[0] for b in loader) == len(rows)


def test_shards_are_refused_with_another_tokenizer_and_errors_are_one_line(tok, tmp_path):
    jsonl = write_jsonl(tmp_path / "corpus.jsonl", corpus_rows(20))
    out = str(tmp_path / "shards")
    assert run("scripts/prepare_data.py", "--data_path", jsonl, "--out_dir", out, "--num_proc", "1").returncode == 0
    other = other_tokenizer(tmp_path)
    with pytest.raises(DataFormatError, match="made with another tokenizer"):
        TokenShardDataset(out, load_tokenizer(other))
    one_line_error(run("train_pretrain.py", *TINY_FLAGS, "--data_path", out, "--tokenizer_path", other,
                       "--out_dir", str(tmp_path / "o")), "made with another tokenizer", "prepare_data.py")
    one_line_error(run("scripts/prepare_data.py", "--data_path", jsonl, "--out_dir", out), "--overwrite 1")
    assert run("scripts/prepare_data.py", "--data_path", jsonl, "--out_dir", out, "--overwrite", "1").returncode == 0
    bad = write_jsonl(tmp_path / "bad.jsonl", corpus_rows(3) + ['{"text": 5}'])
    one_line_error(run("scripts/prepare_data.py", "--data_path", bad, "--out_dir", out, "--overwrite", "1"),
                   "bad.jsonl:4:", '"text" is int')
    assert len(TokenShardDataset(out, tok)) == 20  # a bad corpus never clears the shards already there
    with pytest.raises(DataFormatError, match="token shards from scripts/prepare_data.py: only train_pretrain.py reads it"):
        SFTDataset(out, tok)


def read_losses(out_dir, name):
    with open(os.path.join(out_dir, "logs", name), encoding="utf-8") as f:
        return [json.loads(line)["loss"] for line in f]


def test_pretraining_on_jsonl_parquet_and_shards_gives_the_same_losses(tok, tmp_path):
    """The whole path (validation, sampler order, samples, collate) is the same whatever the input form."""
    rows = corpus_rows(32)
    jsonl = write_jsonl(tmp_path / "corpus.jsonl", rows)
    pq.write_table(arrow_table(rows), tmp_path / "corpus.parquet")
    assert run("scripts/prepare_data.py", "--data_path", jsonl, "--out_dir", str(tmp_path / "shards"),
               "--num_proc", "1").returncode == 0
    flags = [*TINY_FLAGS, "--stop_at_step", "3", "--accumulation_steps", "1"]
    losses = []
    for name, path in [("jsonl", jsonl), ("parquet", str(tmp_path / "corpus.parquet")), ("shards", str(tmp_path / "shards"))]:
        proc = run("train_pretrain.py", *flags, "--data_path", path, "--out_dir", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses.append(read_losses(tmp_path / name, "pretrain_64.jsonl"))
    assert len(losses[0]) == 3 and losses[0] == losses[1] == losses[2]


@pytest.mark.parametrize("script,flag", [("train_pretrain.py", "--text_column"), ("train_lora.py", "--conversations_column"),
                                         ("train_distillation.py", "--conversations_column")])
def test_help_names_the_inputs_and_the_column_flag(script, flag):
    out = run(script, "--help").stdout
    assert flag in out and "parquet" in out and "save_to_disk" in out


# ----------------------------------------------------------------------------------------------------
# progress bars: drawn on a terminal, silent in logs


class FakeStderr(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bar_only_on_a_terminal(monkeypatch, tty):
    from trainer.progress import progress_bar
    fake = FakeStderr(tty)
    monkeypatch.setattr(sys, "stderr", fake)
    monkeypatch.delenv("RANK", raising=False)
    with progress_bar(10, "tokenizing", unit="docs", delay=0) as bar:
        bar.update(10)
    assert ("10/10" in fake.getvalue()) == tty and (fake.getvalue() == "") != tty
    monkeypatch.setenv("RANK", "1")  # other torchrun ranks stay quiet
    with progress_bar(10, "tokenizing", delay=0) as bar:
        bar.update(10)
    assert fake.getvalue().count("10/10") == (1 if tty else 0)
