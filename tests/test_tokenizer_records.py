"""Which tokenizer goes with which weights: the fingerprint in every weight file's .json, the one-line error
when a weight file meets another tokenizer, the note for a bare MiniMind2 .pth, and the reasoning-tag
weights with tokenizers whose tags are one token (ours, MiniMind-3's <think>) or several (MiniMind2's)."""
import json
import os

import pytest
import torch

import small_tokenizers
from conftest import ROOT, run_script
from test_train import write_jsonl
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.tokenizer_fingerprint import tokenizer_fingerprint
from trainer_utils import UserError, check_weight_tokenizer, load_weights, save_weights

OURS = os.path.join(ROOT, "model")
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizers")
    return {"ours": OURS, "minimind2": small_tokenizers.minimind2_like(d / "mm2"),
            "minimind3": small_tokenizers.minimind3_like(d / "mm3")}


def load(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def run(script, *flags):
    return run_script(script, *flags)


def last_line_error(proc):
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr[-2000:]
    return line


# ----------------------------------------------------------------------------------------------------
# The fingerprint and the record in the .json
# ----------------------------------------------------------------------------------------------------
def test_fingerprint_tells_tokenizers_apart_and_survives_save_and_reload(folders, tmp_path):
    prints = {name: tokenizer_fingerprint(load(folder)) for name, folder in folders.items()}
    assert len(set(prints.values())) == 3, prints
    ours = load(OURS)
    ours.save_pretrained(tmp_path / "copy")
    assert tokenizer_fingerprint(load(tmp_path / "copy")) == prints["ours"]
    # same vocabulary, another pad id: ids still mean the same tokens but padding/masking would not
    with open(os.path.join(OURS, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    os.makedirs(tmp_path / "other_pad")
    with open(os.path.join(OURS, "tokenizer.json"), encoding="utf-8") as f, open(tmp_path / "other_pad" / "tokenizer.json", "w") as g:
        g.write(f.read())
    with open(tmp_path / "other_pad" / "tokenizer_config.json", "w", encoding="utf-8") as g:
        json.dump(dict(cfg, pad_token="<|im_end|>"), g)
    assert tokenizer_fingerprint(load(tmp_path / "other_pad")) != prints["ours"]


def test_weight_json_records_the_tokenizer_and_another_tokenizer_is_one_error(folders, tmp_path):
    path = str(tmp_path / "full_sft_64.pth")
    save_weights(MiniMindForCausalLM(MiniMindConfig(**TINY)), path, tokenizer_path=OURS)
    with open(path[:-4] + ".json", encoding="utf-8") as f:
        record = json.load(f)["tokenizer"]
    assert record == {"fingerprint": tokenizer_fingerprint(load(OURS)), "path": OURS, "vocab_size": 6400}
    model = load_weights(path)  # the record is not a config field
    assert not hasattr(model.config, "tokenizer")
    check_weight_tokenizer(path, model, OURS)  # the right one passes silently
    with pytest.raises(UserError) as e:
        check_weight_tokenizer(path, model, folders["minimind2"])
    msg = str(e.value)
    assert "\n" not in msg and path in msg and OURS in msg and folders["minimind2"] in msg
    assert record["fingerprint"] in msg and tokenizer_fingerprint(load(folders["minimind2"])) in msg
    assert f"--tokenizer_path {OURS}" in msg


def test_every_tool_refuses_a_weight_file_with_another_tokenizer(folders, tmp_path):
    """Training stages (via trainer_utils), eval_model.py and convert_model.py: one line naming both."""
    out = tmp_path / "out"
    out.mkdir()
    path = str(out / "full_sft_64.pth")
    save_weights(MiniMindForCausalLM(MiniMindConfig(**TINY)), path, tokenizer_path=OURS)
    other = folders["minimind2"]
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": [{"role": "user", "content": "你好"},
                                                                  {"role": "assistant", "content": "你好！"}]}] * 4)
    procs = {
        "train_full_sft.py": run("train_full_sft.py", "--dim", 64, "--n_layers", 2, "--n_heads", 4, "--device", "cpu",
                                 "--out_dir", out, "--from_weight", path, "--data_path", sft,
                                 "--tokenizer_path", other, "--batch_size", 2, "--num_workers", 0),
        "eval_model.py": run("eval_model.py", "--out_dir", out, "--dim", 64, "--model_mode", 1, "--device", "cpu",
                             "--tokenizer_path", other, "--prompt", "你好", "--max_new_tokens", 2),
        "convert_model.py": run("scripts/convert_model.py", "--weight", path, "--tokenizer_path", other,
                                "--save_dir", tmp_path / "hf"),
    }
    for tool, proc in procs.items():
        line = last_line_error(proc)
        assert path in line and other in line and OURS in line, (tool, line)
    assert not os.path.exists(tmp_path / "hf")


def test_bare_minimind2_pth_gets_a_note_naming_the_tokenizer_flag(tmp_path, capsys):
    path = str(tmp_path / "full_sft_64.pth")
    model = MiniMindForCausalLM(MiniMindConfig(**TINY))
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)  # as MiniMind2 publishes them: no .json
    check_weight_tokenizer(path, model, OURS)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(lines) == 1
    assert path in lines[0] and "MiniMind2's tokenizer" in lines[0] and "--tokenizer_path" in lines[0]


# ----------------------------------------------------------------------------------------------------
# Reasoning tags as token sequences
# ----------------------------------------------------------------------------------------------------
REASON_LINE = {"conversations": [
    {"role": "system", "content": "<think>系统也写了标签</think>"},
    {"role": "user", "content": "请用<think>和<answer>格式回答：1+1=?"},
    {"role": "assistant", "content": "<think>\n1+1=2\n</think>\n<answer>\n2\n</answer>"}]}


@pytest.mark.parametrize("name, tag_lengths", [("ours", [1, 1, 1, 1]), ("minimind2", None), ("minimind3", None)])
def test_reason_weights_cover_each_reply_tag_whole_and_nothing_else(folders, tmp_path, name, tag_lengths):
    import train_distill_reason as tdr
    from dataset.lm_dataset import SFTDataset, make_collate
    tok = load(folders[name])
    sequences = tdr.tag_sequences(tok)
    lengths = [len(s) for s in sequences.values()]
    if tag_lengths:
        assert lengths == tag_lengths
    elif name == "minimind2":
        assert min(lengths) >= 3  # every tag is several tokens
    else:
        assert lengths[:2] == [1, 1] and min(lengths[2:]) >= 3  # <think> is a token, <answer> is not
    ds = SFTDataset(write_jsonl(tmp_path / "r.jsonl", [REASON_LINE]), tok, max_length=256)
    ids, labels = make_collate(tok.pad_token_id)([ds[0]])
    targets, weights, labelled = tdr.tag_weights(labels, list(sequences.values()), 10.0)
    heavy = weights == 10.0
    # the heavy positions, read back as text, are exactly the four tags of the reply (the user's and the
    # system's tags get nothing)
    assert tok.decode(targets[heavy].tolist()) == "<think></think><answer></answer>"
    assert int(heavy.sum()) == sum(lengths)
    assert (weights[labelled & ~heavy] == 1).all() and (weights[~labelled] == 0).all()
    assert tdr.tags_in_data(ds, sequences) == set(tdr.TAGS)


def test_reason_data_whose_tags_are_nowhere_is_one_line_error(folders, tmp_path):
    rows = [{"conversations": [{"role": "user", "content": f"{a}+1=?"}, {"role": "assistant", "content": f"{a + 1}"}]}
            for a in range(8)]
    proc = run("train_distill_reason.py", "--dim", 64, "--n_layers", 2, "--n_heads", 4, "--device", "cpu",
               "--out_dir", tmp_path, "--data_path", write_jsonl(tmp_path / "plain.jsonl", rows),
               "--tokenizer_path", folders["minimind2"], "--batch_size", 2, "--num_workers", 0)
    line = last_line_error(proc)
    assert "plain.jsonl" in line and "<think>" in line and folders["minimind2"] in line
