"""
Datasets for every training stage, reading MiniMind's jsonl formats:

    pretrain              {"text": "..."}                                   -> PretrainDataset
    SFT / LoRA / reasoning {"conversations": [{"role", "content"}, ...]}    -> SFTDataset
    DPO                   {"chosen": [messages], "rejected": [messages]}    -> DPODataset

Chat messages may also carry MiniMind-3's / OpenAI's tool-use and reasoning fields: `tools` on a system
message (or on the line), `tool_calls` and `reasoning_content` on assistant messages, `role: "tool"`
results; `tools` and `tool_calls` may be JSON strings or objects, as the public files have them. A field
a stage cannot use is an error naming it, never dropped silently.

Samples are (input_ids, labels) of equal length, NOT shifted (the model shifts: logits[:, :-1] predict
labels[:, 1:]), unpadded; labels are -100 where there is nothing to learn. Chat data is rendered by the
tokenizer's own chat template (the same call inference makes), and only what the assistant writes (its
think part, content and tool-call blocks) and its closing <|im_end|> are learned.

Inputs (`path`): a jsonl file; a .parquet file, a folder of them (searched recursively) or a glob
("data/*.parquet"); a folder written by `datasets`' save_to_disk. Parquet and Arrow rows have the jsonl
formats' columns and are read through `datasets` (memory-mapped Arrow, imported only for such inputs);
a corpus that names its column differently is read with `columns={"text": "content"}` (--text_column).

Memory: a multi-GB file is never loaded. Construction makes one streaming pass that validates every
record and keeps only a numpy array of line byte offsets (8 bytes a line; Arrow rows need nothing unless
some are skipped); __getitem__ reads, parses and tokenizes one record. Bad data fails at construction,
before any training, with a one-line DataFormatError "path:LINE: problem. fix hint" ("file.parquet: row
R: ...", R counted from 0, for Arrow rows), or is skipped and counted with skip_bad_lines=True.
"""
import functools
import glob
import hashlib
import json
import os
import random
import re
import sys
from array import array

import numpy as np
import torch
from torch.utils.data import Dataset

from trainer.cli import UserError, brief, is_first_rank
from trainer.progress import progress_bar, shows_progress

IGNORE_INDEX = -100
REPO_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model")
INDEX_VERSION = 2  # 2: lines with lone surrogate escapes are bad
CACHE_MIN_BYTES = 64 << 20  # "auto" caches the line index only for files this big; small files index in ms
SKIP_HINT = "Fix the line or pass --skip_bad_lines to skip bad lines."
EXTRA_HINT = "Remove them from the data, or pass --skip_bad_lines to skip such lines."


class DataFormatError(UserError, ValueError):
    """Bad training data. The message is one line: `path:LINE: problem. fix hint`."""


def load_tokenizer(path="model"):
    """The shipped tokenizer (or any local tokenizer dir), loaded offline."""
    if path == "model" and not os.path.isdir(path):
        path = REPO_MODEL_DIR  # default works from any working directory
    if not os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        raise FileNotFoundError(f"{path}: no tokenizer here (need tokenizer.json + tokenizer_config.json). "
                                "Train one with `python train_tokenizer.py` or pass the right directory.")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer.json / tokenizer_config.json, whatever the library says
        raise UserError(f"{path}: cannot load the tokenizer ({brief(e)}); restore its "
                        f"tokenizer.json / tokenizer_config.json, or train one with `python train_tokenizer.py`") from None


# ----------------------------------------------------------------------------------------------------
# validation: each check returns None for a good record, else (problem, hint)

PRETRAIN, SFT, DPO = ('pretrain data ({"text": ...})', 'SFT data ({"conversations": [...]})',
                      'DPO data ({"chosen": [...], "rejected": [...]})')
STAGE_OF_KEY = {  # a key that identifies a stage's file -> (what it looks like, the scripts that take it)
    "text": (PRETRAIN, "train_pretrain.py"),
    "conversations": ('SFT/LoRA/reasoning data ({"conversations": [...]})', "train_full_sft.py, train_lora.py or train_distill_reason.py"),
    "chosen": (DPO, "train_dpo.py"),
}


COLUMN_FLAGS = {"text": str, "conversations": list}  # keys a --{key}_column flag renames, and their values' type


def wrong_stage(obj, expected, key):
    """A missing key; if the line fits another stage, say so (the usual cause is passing the wrong file)."""
    for k, (looks, script) in STAGE_OF_KEY.items():
        if k in obj and k != key and looks != expected:  # a DPO line without "rejected" is not "like DPO data"
            return (f'no "{key}" key: this line looks like {looks}, not {expected}',
                    f"Use this file with {script}, or pass a file of {expected}.")
    keys = ", ".join(f'"{k}"' for k in list(obj)[:5]) or "none"
    fix = f"Each line must be {expected}."
    if key in COLUMN_FLAGS:  # the stage reads the column under another name with a flag: name the likely one
        kind = COLUMN_FLAGS[key]
        fits = [k for k, v in obj.items() if isinstance(v, kind)]
        fix += f" If your data names it differently, pass --{key}_column {fits[0] if len(fits) == 1 else 'NAME'}."
    return f'no "{key}" key (keys: {keys})', f"{fix} {SKIP_HINT}"


def check_pretrain(obj):
    if "text" not in obj:
        return wrong_stage(obj, PRETRAIN, "text")
    if not isinstance(obj["text"], str):
        return f'"text" is {type(obj["text"]).__name__}, not a string', SKIP_HINT
    if not obj["text"].strip():
        return '"text" is empty', SKIP_HINT
    return None


class BadRecord(ValueError):
    """A problem with one record: (problem, hint), turned into `path:LINE: problem. hint` by scan()."""


MESSAGE_FIELDS = {  # role -> fields a message of that role may carry (the chat template renders them)
    "system": {"role", "content", "tools"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "reasoning_content", "tool_calls"},
    "tool": {"role", "content", "tool_call_id", "name"},  # results pair with calls by order, as in Qwen
}
RL_PLACEHOLDERS = ("", "空")  # MiniMind's rlaif.jsonl ends each prompt with the assistant placeholder "空"


def _json_field(value, what):
    """tools / tool_calls / arguments: a JSON string (as in the public files) or the object itself."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRecord(f"{what} is a string but not valid JSON ({e.msg} at column {e.colno})", SKIP_HINT) from None
    return value


def parse_tools(value, what):
    tools = _json_field(value, what)
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRecord(f"{what} must be a list of function schemas (objects), got {type(tools).__name__}", SKIP_HINT)
    for t in tools:
        fn = t.get("function", t)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRecord(f'{what}: each tool needs a "name" (OpenAI shape: {{"type": "function", "function": '
                            f'{{"name": ..., "parameters": ...}}}})', SKIP_HINT)
    return tools


def parse_tool_calls(value, what):
    calls = _json_field(value, what)
    if not isinstance(calls, list) or not calls:
        raise BadRecord(f"{what} must be a non-empty list of calls", SKIP_HINT)
    out = []
    for j, call in enumerate(calls, 1):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or "arguments" not in fn:
            raise BadRecord(f'{what} call {j} needs "name" and "arguments" (OpenAI shape: {{"type": "function", '
                            f'"function": {{"name": ..., "arguments": ...}}}})', SKIP_HINT)
        args = _json_field(fn["arguments"], f"{what} call {j} arguments")
        if not isinstance(args, dict):
            raise BadRecord(f"{what} call {j} arguments must be a JSON object, got {type(args).__name__}", SKIP_HINT)
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    return out


def _empty(value):
    """null or "": how exports that give every message every field (MiniMind-3's datasets Features: role,
    content, reasoning_content, tools, tool_calls, all strings) spell a field the message does not have."""
    return value is None or value == ""


def chat_messages(msgs, field, tools=None, rl_prompt=False):
    """Validate a conversation and return (messages, tools) as the chat template takes them: JSON strings
    parsed, `tools` lifted off the system message. rl_prompt: the last assistant message is RL data's
    placeholder for the reply to sample. Raises BadRecord."""
    if not isinstance(msgs, list):
        raise BadRecord(f'"{field}" is {type(msgs).__name__}, not a list of messages', SKIP_HINT)
    if not msgs:
        raise BadRecord(f'"{field}" is an empty list', SKIP_HINT)
    out = []
    for i, m in enumerate(msgs, 1):
        where = f'"{field}" message {i}'
        if not isinstance(m, dict):
            raise BadRecord(f'{where} is {type(m).__name__}, not an object with "role" and "content"', SKIP_HINT)
        if "role" not in m:
            raise BadRecord(f'{where} has no "role"', SKIP_HINT)
        role = m["role"]
        if role not in MESSAGE_FIELDS:
            raise BadRecord(f'{where} has unknown role {json.dumps(role, ensure_ascii=False)} '
                            f'(expected system, user, assistant or tool)', SKIP_HINT)
        extra = [k for k in m if k not in MESSAGE_FIELDS[role] and not _empty(m[k])]
        if extra:
            raise BadRecord(f'{where} ({role}) has field(s) {", ".join(json.dumps(k) for k in extra)} that chat training '
                            f'does not use', EXTRA_HINT)
        msg = {"role": role}
        if role == "assistant" and not _empty(m.get("tool_calls")):
            msg["tool_calls"] = parse_tool_calls(m["tool_calls"], f"{where} tool_calls")
        content = m.get("content")
        if "content" not in m and "tool_calls" not in msg:
            raise BadRecord(f'{where} has no "content"', SKIP_HINT)
        if content is None and "tool_calls" in msg:
            content = ""  # OpenAI sends null content beside tool calls
        if not isinstance(content, str):
            raise BadRecord(f'{where} "content" is {type(content).__name__}, not a string', SKIP_HINT)
        msg["content"] = content
        if role == "assistant" and m.get("reasoning_content") is not None:
            if not isinstance(m["reasoning_content"], str):
                raise BadRecord(f'{where} "reasoning_content" is {type(m["reasoning_content"]).__name__}, not a string', SKIP_HINT)
            msg["reasoning_content"] = m["reasoning_content"]
        if role == "system" and not _empty(m.get("tools")) and m["tools"] != []:
            if tools is not None:
                raise BadRecord(f"{where} has tools, but the conversation already has tools", SKIP_HINT)
            tools = parse_tools(m["tools"], f"{where} tools")
        out.append(msg)
    assistants = [m for m in out if m["role"] == "assistant"]
    if not assistants:
        raise BadRecord(f'"{field}" has no assistant message, so there is nothing to learn', SKIP_HINT)
    if out[0]["role"] == "assistant":
        raise BadRecord(f'"{field}" starts with an assistant message: no prompt comes before it', SKIP_HINT)
    last = assistants[-1]
    if not rl_prompt and last["content"].strip() in RL_PLACEHOLDERS and "tool_calls" not in last and "reasoning_content" not in last:
        raise BadRecord(f'"{field}" ends with an empty or placeholder assistant reply ({json.dumps(last["content"], ensure_ascii=False)}): '
                        f"this looks like RL-prompt data (rlaif.jsonl)",
                        "Use it with train_grpo.py or train_ppo.py, or give that message a real reply.")
    return out, tools


def line_tools(obj):
    """The line's own "tools" field (beside the conversation), parsed; None when it has none."""
    return None if _empty(obj.get("tools")) or obj["tools"] == [] else parse_tools(obj["tools"], '"tools"')


def check_sft(obj):
    if "conversations" not in obj:
        return wrong_stage(obj, SFT, "conversations")
    extra = [k for k in obj if k not in ("conversations", "tools")]
    if extra:
        if any(k in ("gt", "answer") for k in extra):
            return (f'field {json.dumps(extra[0])} is a ground truth for rewards: this looks like RL-prompt data (rlaif.jsonl)',
                    "Use it with train_grpo.py or train_ppo.py.")
        return (f'field(s) {", ".join(json.dumps(k) for k in extra)} beside "conversations" are not used by chat training',
                EXTRA_HINT)
    tools = line_tools(obj)
    chat_messages(obj["conversations"], "conversations", tools)
    return None


def check_dpo(obj):
    for key in ("chosen", "rejected"):
        if key not in obj:
            return wrong_stage(obj, DPO, key)
    extra = [k for k in obj if k not in ("chosen", "rejected")]
    if extra:
        return (f'field(s) {", ".join(json.dumps(k) for k in extra)} beside "chosen" and "rejected" are not used by DPO',
                EXTRA_HINT)
    chat_messages(obj["chosen"], "chosen")
    chat_messages(obj["rejected"], "rejected")
    return None


def parse_line(raw):
    """bytes -> dict, or raise ValueError with a short reason."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:  # some messages end in "at" ("Unterminated string starting at")
        # an object pretty-printed over several lines (as tutorials show them) breaks off at its first line's end
        spread = "; a .jsonl file needs each JSON object on one line" if e.pos >= len(e.doc.rstrip()) else ""
        raise ValueError(f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno}){spread}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"a JSON {type(obj).__name__}, not an object")
    if SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(obj):  # valid JSON, but no tokenizer can encode it
        raise ValueError("a string holds a lone surrogate escape (\\ud800-\\udfff), not valid Unicode text")
    return obj


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(x):
    if isinstance(x, str):
        try:
            x.encode("utf-8")  # an escaped surrogate *pair* was joined into one character by json.loads
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(x, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in x.items())
    if isinstance(x, list):
        return any(_has_lone_surrogate(v) for v in x)
    return False


def scan(path, check, skip_bad_lines):
    """One streaming pass: validate every line, return (offsets of good lines, skipped count, first error)."""
    offsets, skipped, first_error = array("q"), 0, None
    pos = 0
    bar = progress_bar(os.path.getsize(path), f"indexing {os.path.basename(path)}", unit="B", unit_scale=True)
    with open(path, "rb") as f, bar:
        for lineno, raw in enumerate(f, 1):
            start, pos = pos, pos + len(raw)
            if lineno % 65536 == 0:
                bar.update(pos - bar.n)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
                raw, start = raw[3:], start + 3
            if not raw.strip():
                continue  # blank lines are allowed and ignored
            try:
                problem = check(parse_line(raw))
            except BadRecord as e:
                problem = e.args
            except ValueError as e:
                problem = (str(e), SKIP_HINT)
            if problem is None:
                offsets.append(start)
                continue
            error = f"{path}:{lineno}: {problem[0]}. {problem[1]}"
            if not skip_bad_lines:
                raise DataFormatError(error)
            skipped += 1
            first_error = first_error or error
        bar.update(pos - bar.n)
    return np.frombuffer(offsets, dtype=np.int64), skipped, first_error  # a view: no second copy


def cached_scan(path, kind, check, skip_bad_lines, cache_index):
    """scan(), optionally cached next to the data file as <file>.<kind>.idx.npz keyed by size + mtime."""
    st = os.stat(path)
    use_cache = cache_index is True or (cache_index == "auto" and st.st_size >= CACHE_MIN_BYTES)
    cache = f"{path}.{kind}.idx.npz"
    key = {"version": INDEX_VERSION, "kind": kind, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if use_cache and os.path.exists(cache):
        try:
            with np.load(cache, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta["key"] == key:
                    if meta["skipped"] and not skip_bad_lines:
                        raise DataFormatError(meta["first_error"])  # the cached pass saw bad lines
                    return z["offsets"], meta["skipped"], meta["first_error"]
        except DataFormatError:
            raise
        except Exception:  # noqa: BLE001 - a broken cache is just rebuilt
            pass
    offsets, skipped, first_error = scan(path, check, skip_bad_lines)
    if use_cache:
        meta = {"key": key, "skipped": skipped, "first_error": first_error}
        try:  # best effort (read-only dirs are fine); write-then-rename so ranks never read half a file
            tmp = f"{cache}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                np.savez(f, offsets=offsets, meta=np.array(json.dumps(meta)))
            os.replace(tmp, cache)
        except OSError:
            pass
    return offsets, skipped, first_error


# ----------------------------------------------------------------------------------------------------
# record sources: a jsonl file (line offsets) or Arrow rows (parquet, a save_to_disk folder)


def rename_columns(obj, columns):
    """The record with a corpus's own column names mapped to the stage's keys: columns={"text": "content"}
    reads obj["content"] as obj["text"]."""
    out = {k: v for k, v in obj.items() if k not in columns.values()}
    for key, source in columns.items():
        out[key] = obj[source]
    return out


def check_columns(obj, check, columns):
    """A stage's check, run on a record whose columns are named by --text_column / --conversations_column."""
    for key, source in columns.items():
        if source not in obj:
            keys = ", ".join(f'"{k}"' for k in list(obj)[:5]) or "none"
            return f'no "{source}" key (named by --{key}_column; keys: {keys})', f"Pass the right --{key}_column. {SKIP_HINT}"
    return check(rename_columns(obj, columns))


class JsonlRecords:
    """The records of a jsonl file: one validating pass keeps each good line's byte offset; a record is then one
    seek and one line read."""
    unit = "line"

    def __init__(self, path, kind, check, skip_bad_lines, cache_index):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: data file not found")
        self.path = path
        self.offsets, self.skipped, self.first_error = cached_scan(path, kind, check, skip_bad_lines, cache_index)
        self._fh, self._pid = None, None

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i):
        if self._fh is None or self._pid != os.getpid():  # one handle per DataLoader worker process
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(int(self.offsets[i]))
        return json.loads(self._fh.readline())

    def where(self, i):
        """"path:LINE" of sample i, for messages (reads the file up to it: call it for a few samples only)."""
        line, left = 1, int(self.offsets[i])
        with open(self.path, "rb") as f:
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                line, left = line + chunk.count(b"\n"), left - len(chunk)
        return f"{self.path}:{line}"

    def __getstate__(self):  # picklable for spawn-started workers; each reopens its own handle
        return {**self.__dict__, "_fh": None, "_pid": None}

    def empty_error(self, kind):
        if self.skipped:
            return f"{self.path}:1: all {self.skipped} non-blank lines are bad; first: {self.first_error}"
        return f"{self.path}:1: no records (the file is empty or blank). Pass a {kind} jsonl file with at least one line."


def is_arrow_input(path):
    """True for the inputs read through `datasets`: a .parquet file, a glob, or a folder."""
    return path.endswith(".parquet") or glob.has_magic(path) or os.path.isdir(path)


def import_datasets(path):
    try:
        import datasets
    except ImportError:
        raise DataFormatError(f"{path}: reading parquet or a datasets folder needs the `datasets` package "
                              f"(pip install -r requirements.txt), or pass a jsonl file") from None
    if not shows_progress():
        datasets.disable_progress_bars()  # its "Generating train split" bars would fill the logs
    return datasets


def open_arrow(path):
    """(datasets.Dataset, [(file, rows), ...]) for a parquet file, folder or glob, or a save_to_disk folder."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "index.json")):
            raise DataFormatError(f"{path}: a folder of token shards from scripts/prepare_data.py: only "
                                  f"train_pretrain.py reads it. Pass the jsonl or parquet data this stage needs.")
        if os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json")):
            return open_saved(path), [(path, None)]
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        if not files:
            raise FileNotFoundError(f"{path}: no .parquet files in this folder, and no folder written by datasets' save_to_disk")
    elif glob.has_magic(path):
        files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise FileNotFoundError(f"{path}: no files match")
        if any(not f.endswith(".parquet") for f in files):
            odd = next(f for f in files if not f.endswith(".parquet"))
            raise DataFormatError(f"{path}: matches {odd}, which is not a .parquet file. A glob may only name parquet files.")
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: data file not found")
    else:
        files = [path]
    datasets = import_datasets(path)
    import pyarrow.parquet as pq
    try:
        files = [(f, pq.ParquetFile(f).metadata.num_rows) for f in files]
        files = [(f, n) for f, n in files if n > 0]  # datasets fails on a file with no rows
        if not files:
            raise DataFormatError(f"{path}: no rows. Pass parquet data with at least one row.")
        table = datasets.load_dataset("parquet", data_files=[os.path.abspath(f) for f, _ in files], split="train")
    except DataFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - not parquet, or files whose columns differ
        raise DataFormatError(f"{path}: cannot read it as parquet ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if sum(n for _, n in files) != len(table):
        return table, [(path, None)]  # rows are then counted over all files
    return table, files


def open_saved(path):
    """A folder written by Dataset.save_to_disk (or DatasetDict.save_to_disk: its "train" or only split)."""
    datasets = import_datasets(path)
    try:
        saved = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001
        raise DataFormatError(f"{path}: cannot read this datasets folder ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(saved, datasets.DatasetDict):
        if "train" not in saved and len(saved) != 1:
            raise DataFormatError(f"{path}: a DatasetDict with splits {', '.join(saved)} and no \"train\" split. "
                                  f"Pass one split's folder, e.g. {os.path.join(path, next(iter(saved)))}")
        saved = saved["train"] if "train" in saved else next(iter(saved.values()))
    return saved


def from_arrow(value, feature):
    """An Arrow value as the JSON it was made from. A struct (a dict feature) gets every field its column
    has anywhere, null where the object had none, so its null fields are read as absent, at every depth; a
    value of datasets' Json type comes back exactly as it was written."""
    if isinstance(feature, dict) and isinstance(value, dict):
        return {k: from_arrow(v, feature.get(k)) for k, v in value.items() if v is not None}
    inner = getattr(feature, "feature", None)  # List / LargeList
    if isinstance(value, list) and inner is not None:
        return [from_arrow(v, inner) for v in value]
    return value


class ArrowRecords:
    """Rows of parquet files or a save_to_disk folder, memory-mapped by `datasets`: one validating pass over
    them, then a record is one row read."""
    unit = "row"
    BATCH = 1024

    def __init__(self, path, check, skip_bad_lines):
        self.path = path
        self.table, self.files = open_arrow(path)
        self.features = self.table.features  # (a property that copies them)
        self.file_starts = np.cumsum([0] + [n or 0 for _, n in self.files[:-1]])
        good, self.skipped, self.first_error = array("q"), 0, None
        bar = progress_bar(len(self.table), f"checking {os.path.basename(path.rstrip(os.sep))}", unit="rows")
        with bar:
            for start in range(0, len(self.table), self.BATCH):
                batch = self.table[start:start + self.BATCH]  # {column: values}
                n = min(self.BATCH, len(self.table) - start)
                for j in range(n):
                    try:
                        problem = check(self.as_record({c: v[j] for c, v in batch.items()}))
                    except BadRecord as e:
                        problem = e.args
                    if problem is None:
                        good.append(start + j)
                        continue
                    error = f"{self.where_row(start + j)}: {problem[0]}. {problem[1]}"
                    if not skip_bad_lines:
                        raise DataFormatError(error)
                    self.skipped += 1
                    self.first_error = self.first_error or error
                bar.update(n)
        # the good rows' numbers are kept only when some were skipped (8 bytes a row)
        self.rows = np.frombuffer(good, dtype=np.int64) if self.skipped else None

    def as_record(self, row):
        return {c: from_arrow(v, self.features[c]) for c, v in row.items() if v is not None}

    def __len__(self):
        return len(self.table) if self.rows is None else len(self.rows)

    def row(self, i):
        return i if self.rows is None else int(self.rows[i])

    def __getitem__(self, i):
        return self.as_record(self.table[self.row(i)])

    def where_row(self, r):
        """`file: row N` for table row r, N counted from 0 within that parquet file."""
        f = int(np.searchsorted(self.file_starts, r, side="right")) - 1
        file, rows = self.files[f]
        return f"{file}: row {r - self.file_starts[f] if rows is not None else r}"

    def where(self, i):
        return self.where_row(self.row(i))

    def empty_error(self, kind):
        if self.skipped:
            return f"{self.path}: all {self.skipped} rows are bad; first: {self.first_error}"
        return f"{self.path}: no rows. Pass {kind} data with at least one row."


# ----------------------------------------------------------------------------------------------------
# datasets


class RecordDataset(Dataset):
    """Validated records of a stage's data, from jsonl or Arrow, and the tokenizer to encode them. A stage's
    dataset sets `kind` and `check` and turns record(i) into a sample in __getitem__."""
    kind, check = None, None

    def __init__(self, path, tokenizer, max_length, skip_bad_lines=False, cache_index="auto", columns=None):
        self.path, self.tokenizer, self.max_length = path, tokenizer, max_length
        self.columns = {k: v for k, v in (columns or {}).items() if k != v}
        check, kind = type(self).check, self.kind
        if self.columns:
            check = functools.partial(check_columns, check=check, columns=self.columns)
            kind += "." + hashlib.sha1(json.dumps(self.columns, sort_keys=True).encode()).hexdigest()[:8]  # its own index cache
        if is_arrow_input(path):
            self.source = ArrowRecords(path, check, skip_bad_lines)
        else:
            self.source = JsonlRecords(path, kind, check, skip_bad_lines, cache_index)
        self.skipped = self.source.skipped
        if self.source.first_error:  # the summary must not tell the user to pass the --skip_bad_lines they passed
            self.source.first_error = self.source.first_error.replace(f" {SKIP_HINT}", "")
        if len(self.source) == 0:
            raise DataFormatError(self.source.empty_error(self.kind))
        if self.skipped and is_first_rank():
            print(f"warning: {path}: skipped {self.skipped} bad {self.source.unit}(s) (--skip_bad_lines); "
                  f"first: {self.source.first_error}", file=sys.stderr)

    @property
    def offsets(self):
        """Byte offset of each jsonl record."""
        return self.source.offsets

    def __len__(self):
        return len(self.source)

    def record(self, i):
        """Record i as a dict with the stage's keys (one line read and parsed, or one Arrow row)."""
        rec = self.source[i]
        return rename_columns(rec, self.columns) if self.columns else rec

    def where(self, i):
        """`path:LINE` or `file: row N` of record i, for error messages."""
        return self.source.where(i)

    def encode_text(self, text):
        return encode_plain(self.tokenizer, text)

    def encode(self, messages, tools, i):
        """encode_chat, with a template failure reported as this file's problem."""
        try:
            return encode_chat(self.tokenizer, messages, self.max_length, tools)
        except Exception as e:  # noqa: BLE001 - a Jinja error in a user's template, or ChatTemplateError
            raise DataFormatError(f"{self.where(i)}: the chat template of the tokenizer cannot render this "
                                  f"conversation ({brief(e)}). Check --tokenizer_path, or fix the line") from None


JsonlDataset = RecordDataset  # its former name, kept for datasets written against it


class PretrainDataset(RecordDataset):
    """bos + text + eos, cut to max_length (the eos survives only if it fits); every token is a target."""
    kind, check = "pretrain", check_pretrain

    def __init__(self, path, tokenizer, max_length=512, skip_bad_lines=False, cache_index="auto", text_column="text"):
        super().__init__(path, tokenizer, max_length, skip_bad_lines, cache_index, columns={"text": text_column})

    def tokens(self, i):
        """The whole document's ids, before the cut (what scripts/prepare_data.py stores)."""
        tok = self.tokenizer
        return [tok.bos_token_id] + self.encode_text(self.record(i)["text"]) + [tok.eos_token_id]

    def __getitem__(self, i):
        ids = torch.tensor(self.tokens(i)[: self.max_length], dtype=torch.long)
        return ids, ids.clone()


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be used to derive labels (it rewrites earlier turns)."""


# Generation prompts to try, in order, when finding where an assistant turn starts: plain, then thinking
# on, then off (MiniMind-3's template pre-fills an empty think block unless `open_thinking` is set). A turn
# whose reasoning_content is empty is a thinking-off turn: its empty think block belongs to the prompt (what
# enable_thinking=False pre-fills), so the model learns to answer after it, not to skip thinking on its own.
THINKING_ON, THINKING_OFF = {"enable_thinking": True, "open_thinking": True}, {"enable_thinking": False, "open_thinking": False}
GENERATION_PROMPTS = ({}, THINKING_ON, THINKING_OFF)
THINKING_OFF_FIRST = (THINKING_OFF, {}, THINKING_ON)


def encode_plain(tokenizer, text):
    """tokenizer.encode(text, add_special_tokens=False), through the tokenizers library directly where the tokenizer
    has it: the same ids without transformers' per-call overhead (the demo corpus loads 14-26% faster)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # A call like tokenizer(text, truncation=True, max_length=n) leaves its truncation set on the backend, where it
    # would cut every text after it; tokenizer.encode clears it again.
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer.encode(text, add_special_tokens=False)
    return backend.encode(text, add_special_tokens=False).ids


def render_chat(tokenizer, messages, tools=None, add_generation_prompt=False, **template_kwargs):
    """The conversation as text, by the tokenizer's own chat template: the one call training, eval_model.py,
    the server and the RL rollouts all make."""
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **template_kwargs)


def encode_chat(tokenizer, messages, max_length=None, tools=None):
    """Tokenize a conversation as its chat template renders it; labels = the ids of what each assistant turn
    writes (think part, content, tool calls) and its closing <|im_end|>, -100 everywhere else.

    For the assistant turn i, the text before it is exactly the generation prompt inference would build
    from messages[:i] (so training prompt == inference prompt, whatever the template adds: a default
    system prompt, tool schemas, a pre-filled think block), and its reply is tokenized on its own, as the
    model generates it after that prompt. Special tokens cut the text into independently tokenized
    segments, so for a ChatML template the ids equal tokenizing the whole rendering (tests check it)."""
    eos = tokenizer.eos_token
    ids, labels, done = [], [], ""

    def add(text, learn):
        piece = encode_plain(tokenizer, text)
        ids.extend(piece)
        labels.extend(piece if learn else [IGNORE_INDEX] * len(piece))

    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        turn = render_chat(tokenizer, messages[:i + 1], tools)
        prompt = None
        for kwargs in THINKING_OFF_FIRST if m.get("reasoning_content") == "" else GENERATION_PROMPTS:
            candidate = render_chat(tokenizer, messages[:i], tools, add_generation_prompt=True, **kwargs)
            if turn.startswith(candidate):
                prompt = candidate
                break
        if prompt is None or not prompt.startswith(done):
            raise ChatTemplateError("the tokenizer's chat template renders earlier turns differently once a later "
                                    "turn is added, so assistant labels cannot be derived from it")
        add(prompt[len(done):], learn=False)
        reply = turn[len(prompt):]
        end = reply.rfind(eos)
        end = len(reply) if end < 0 else end + len(eos)
        add(reply[:end], learn=True)
        add(reply[end:], learn=False)  # the template's newline after <|im_end|>
        done = turn
    # the whole conversation; already rendered as the last turn when it ends with an assistant message
    rest = done if messages and messages[-1]["role"] == "assistant" else render_chat(tokenizer, messages, tools)
    if not rest.startswith(done):
        raise ChatTemplateError("the tokenizer's chat template renders earlier turns differently once a later "
                                "turn is added, so assistant labels cannot be derived from it")
    add(rest[len(done):], learn=False)  # messages after the last assistant turn, if any
    if max_length is not None:  # plain cut: labels stay aligned, so no prompt token ever gets a label
        ids, labels = ids[:max_length], labels[:max_length]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


class SFTDataset(RecordDataset):
    """Chat data for full SFT, LoRA and reasoning distillation."""
    kind, check = "sft", check_sft

    def __init__(self, path, tokenizer, max_length=1024, skip_bad_lines=False, cache_index="auto",
                 conversations_column="conversations"):
        super().__init__(path, tokenizer, max_length, skip_bad_lines, cache_index,
                         columns={"conversations": conversations_column})

    def __getitem__(self, i):
        rec = self.record(i)
        messages, tools = chat_messages(rec["conversations"], "conversations", line_tools(rec))
        return self.encode(messages, tools, i)


class DPODataset(RecordDataset):
    """Preference pairs; each side labelled like SFT."""
    kind, check = "dpo", check_dpo

    def __init__(self, path, tokenizer, max_length=1024, skip_bad_lines=False, cache_index="auto"):
        super().__init__(path, tokenizer, max_length, skip_bad_lines, cache_index)

    def __getitem__(self, i):
        rec = self.record(i)
        c_ids, c_lab = self.encode(chat_messages(rec["chosen"], "chosen")[0], None, i)
        r_ids, r_lab = self.encode(chat_messages(rec["rejected"], "rejected")[0], None, i)
        return {"chosen_input_ids": c_ids, "chosen_labels": c_lab, "rejected_input_ids": r_ids, "rejected_labels": r_lab}


# ----------------------------------------------------------------------------------------------------
# batching


def make_collate(pad_id=0, pad_to_multiple_of=None, max_length=None):
    """Right-pad a batch: input_ids with pad_id, labels with -100 (padding never carries loss).
    Tuple samples -> (input_ids, labels); DPO dict samples -> dict of 4 tensors, chosen and rejected padded
    to one common length. max_length truncates; pad_to_multiple_of rounds T up (capped at max_length), so
    pad_to_multiple_of=max_length gives fixed [B, max_length] shapes."""

    def length(seqs):
        T = max(len(s) for s in seqs)
        if max_length is not None:
            T = min(T, max_length)
        if pad_to_multiple_of:
            T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
            if max_length is not None:
                T = min(T, max_length)
        return T

    def pad(seqs, value, T):
        out = torch.full((len(seqs), T), value, dtype=torch.long)
        for i, s in enumerate(seqs):
            s = torch.as_tensor(s, dtype=torch.long)[:T]
            out[i, : len(s)] = s
        return out

    def collate(batch):
        if isinstance(batch[0], dict):
            T = length([s[k] for s in batch for k in ("chosen_input_ids", "rejected_input_ids")])
            return {k: pad([s[k] for s in batch], IGNORE_INDEX if k.endswith("labels") else pad_id, T) for k in batch[0]}
        ids, labels = zip(*batch)
        T = length(ids)
        return pad(ids, pad_id, T), pad(labels, IGNORE_INDEX, T)

    return collate


collate_fn = make_collate()


def make_pack_collate(max_length, pad_id=0):
    """--packing: put a batch's samples into as few rows of at most max_length tokens as they fit (first fit,
    longest first) instead of padding each to the longest. Returns (input_ids, labels, position_ids).

    Positions restart at 0 at each sample; the model reads those restarts as sample boundaries (attention
    never crosses them). Each sample's first label is dropped so the last token of one sample is never
    trained to predict the first token of the next; that label is never used without packing either, so
    the packed loss equals the padded one for the same samples. Trailing padding counts as one more sample."""

    def collate(batch):
        rows, space = [], []
        for ids, labels in sorted(batch, key=lambda s: -len(s[0])):
            ids, labels = ids[:max_length], labels[:max_length]
            for r, free in enumerate(space):
                if free >= len(ids):
                    rows[r].append((ids, labels))
                    space[r] -= len(ids)
                    break
            else:
                rows.append([(ids, labels)])
                space.append(max_length - len(ids))
        T = max_length - min(space)
        input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        label_out = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), T), dtype=torch.long)
        for r, row in enumerate(rows):
            t = 0
            for ids, labels in row:
                n = len(ids)
                input_ids[r, t:t + n] = ids
                label_out[r, t + 1:t + n] = labels[1:]
                position_ids[r, t:t + n] = torch.arange(n)
                t += n
            position_ids[r, t:] = torch.arange(T - t)
        return input_ids, label_out, position_ids

    return collate


# ----------------------------------------------------------------------------------------------------
# RL prompts (train_grpo.py, train_ppo.py): MiniMind's rlaif.jsonl, one conversation a line whose last
# assistant message is a placeholder (its content is not used), plus an optional ground truth for
# verifiable rewards: "gt" (a string, a number or a list of them, any of which is right) or "answer".

RL = 'RL prompt data ({"conversations": [..., {"role": "assistant", "content": ""}], "gt": ...})'
END_WITH_PLACEHOLDER = 'End each conversation with the placeholder {"role": "assistant", "content": ""}.'


def ground_truth(obj):
    """The line's accepted answers as strings ([] when it has none)."""
    value = obj.get("gt", obj.get("answer"))
    if value is None:
        return []
    return [str(v).strip() for v in (value if isinstance(value, list) else [value])]


def check_ground_truth(obj):
    if "gt" in obj and "answer" in obj:
        return 'has both "gt" and "answer"', f'Keep one ground-truth field. {SKIP_HINT}'
    key = "gt" if "gt" in obj else "answer" if "answer" in obj else None
    if key is None:
        return None
    what = "a string, a number or a list of them" if key == "gt" else "a string or a number"
    values = obj[key] if isinstance(obj[key], list) and key == "gt" else [obj[key]]
    if not values:
        return f'"{key}" is an empty list', SKIP_HINT
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            return f'"{key}" holds {json.dumps(v, ensure_ascii=False)[:40]}, not {what}', SKIP_HINT
        if isinstance(v, str) and not v.strip():
            return f'"{key}" holds an empty string', SKIP_HINT
    return None


def check_prompt_line(obj, what, stage, ends, end_hint):
    """What RL and agent RL lines share: their fields, an assistant message after the prompt, and the role the
    prompt ends with (one of `ends`). -> None, or (problem, hint)."""
    if "conversations" not in obj:
        return wrong_stage(obj, what, "conversations")
    extra = [k for k in obj if k not in ("conversations", "tools", "gt", "answer")]
    if extra:
        return (f'field(s) {", ".join(json.dumps(k) for k in extra)} beside "conversations" are not used by {stage}',
                EXTRA_HINT)
    msgs = obj["conversations"]
    if isinstance(msgs, list) and all(isinstance(m, dict) for m in msgs) and not any(m.get("role") == "assistant" for m in msgs):
        return '"conversations" has no assistant message, so nothing marks where the reply starts', f"{end_hint} {SKIP_HINT}"
    msgs, _ = chat_messages(msgs, "conversations", line_tools(obj), rl_prompt=True)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    if msgs[last - 1]["role"] not in ends:
        return (f"the prompt (everything before the last assistant message) does not end with a {' or '.join(ends)} message",
                f"{end_hint} {SKIP_HINT}")
    return None


def check_rl(obj):
    return check_prompt_line(obj, RL, "RL", ("user",), END_WITH_PLACEHOLDER) or check_ground_truth(obj)


def check_rl_with_gt(obj):
    problem = check_rl(obj)
    if problem is None and not ground_truth(obj):
        return ('no ground truth ("gt" or "answer"), which --rewards answer needs on every line',
                f"Add the right answer as \"gt\", or drop answer from --rewards for open-ended prompts. {SKIP_HINT}")
    return problem


class RLPromptDataset(RecordDataset):
    """Prompts to sample replies to. A sample is {"prompt_ids", "messages", "tools", "reply_prefix", "gt"}:
    reply_prefix is any part of the assistant turn the template pre-fills (e.g. "<think>\\n"), which the
    rewards read in front of the sampled reply. A prompt longer than max_length keeps its last tokens.
    enable_thinking (None: not passed) goes to the chat template, which then opens the reply with <think>
    or pre-fills an empty think block. thinking_ratio (instead): prompt i thinks with that probability, drawn
    from i alone, so every epoch and a resumed run give each prompt the same mode."""
    kind, check = "rl", check_rl

    def __init__(self, path, tokenizer, max_length=512, enable_thinking=None, skip_bad_lines=False, cache_index="auto",
                 conversations_column="conversations", thinking_ratio=None):
        super().__init__(path, tokenizer, max_length, skip_bad_lines, cache_index,
                         columns={"conversations": conversations_column})
        self.enable_thinking, self.thinking_ratio = enable_thinking, thinking_ratio

    def thinking(self, i):
        if self.thinking_ratio is None:
            return self.enable_thinking
        return random.Random(f"thinking-{i}").random() < self.thinking_ratio

    def __getitem__(self, i):
        rec = self.record(i)
        msgs, tools = chat_messages(rec["conversations"], "conversations", line_tools(rec), rl_prompt=True)
        messages = msgs[:max(j for j, m in enumerate(msgs) if m["role"] == "assistant")]
        thinking = self.thinking(i)
        kwargs = {} if thinking is None else {"enable_thinking": thinking}
        text = render_chat(self.tokenizer, messages, tools, add_generation_prompt=True, **kwargs)
        header = f"{self.tokenizer.bos_token}assistant\n"
        reply_prefix = text.rsplit(header, 1)[1] if header in text else ""
        return {"prompt_ids": self.encode_text(text)[-self.max_length:], "messages": messages, "tools": tools,
                "reply_prefix": reply_prefix, "template_kwargs": kwargs, "gt": ground_truth(rec)}


class VerifiableRLPromptDataset(RLPromptDataset):
    """RL prompts that must each carry a ground truth (what --rewards answer checks replies against)."""
    kind, check = "rl_gt", check_rl_with_gt


# ----------------------------------------------------------------------------------------------------
# Agent RL prompts (train_agent.py): MiniMind-3's agent_rl.jsonl, a conversation whose system message offers
# "tools" and whose last assistant message (a reference reply, not used) follows the prompt, plus "gt": the
# values the final answer must hold after the tool calls (a list; [] when there is nothing to check).

AGENT = ('agent RL data ({"conversations": [{"role": "system", "tools": [...]}, {"role": "user", ...}, '
         '{"role": "assistant", ...}], "gt": [...]})')


def check_agent(obj):
    problem = check_prompt_line(obj, AGENT, "agent RL", ("user", "tool"),
                                "End each conversation with an assistant message (its content is not used).")
    if problem or obj.get("gt") == []:  # gt []: nothing to check in the final answer (MiniMind-3's data has such lines)
        return problem
    return check_ground_truth(obj)


class AgentPromptDataset(RLPromptDataset):
    """Agent RL prompts: an RL prompt sample, with "gt" all the values the final answer should hold."""
    kind, check = "agent", check_agent
