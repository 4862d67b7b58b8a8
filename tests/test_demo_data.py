"""dataset/build_demo_data.py: deterministic bytes, valid formats, checkable content, eval splits held out;
and the demo's copy probe."""
import json
import os
import re
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataset import build_demo_data as B  # noqa: E402
from dataset.lm_dataset import check_agent, check_dpo, check_pretrain, check_rl_with_gt, check_sft  # noqa: E402
from trainer.tools import TOOLS, run_tool_call  # noqa: E402

SMALL = dict(pretrain_eval=20, pretrain_tools=60, pretrain_records=30, pretrain_arith=30, sft=300, sft_eval=40, sft_tools=60, tool_eval=30, dpo=200, dpo_eval=40, r1=200, r1_eval=40,
             lora_identity=100, lora_identity_eval=20, lora_medical=50, rlaif=100, rlaif_eval=20, agent_rl=60)
TRAIN_EVAL = [("pretrain_hq.jsonl", "pretrain_eval.jsonl"), ("sft_mini_512.jsonl", "sft_eval.jsonl"),
              ("dpo.jsonl", "dpo_eval.jsonl"), ("r1_mix_1024.jsonl", "r1_eval.jsonl"),
              ("lora_identity.jsonl", "lora_identity_eval.jsonl"), ("rlaif.jsonl", "rlaif_eval.jsonl")]
CHAT_FILES = ["sft_mini_512.jsonl", "sft_eval.jsonl", "r1_mix_1024.jsonl", "r1_eval.jsonl", "lora_identity.jsonl",
              "lora_identity_eval.jsonl", "lora_medical.jsonl"]


def read(d, name):
    with open(os.path.join(d, name), encoding="utf-8") as f:
        return [json.loads(l) for l in f]


def prompts(records):
    return {B.prompt_key(r["chosen"] if "chosen" in r else r["conversations"]) for r in records}


def reply(rec):
    return rec["conversations"][-1]["content"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("demo_a"))
    B.build(d, pretrain_zh_chars=20000, pretrain_en_chars=10000, verbose=False, **SMALL)
    return d


def test_build_is_byte_identical_twice(small, tmp_path):
    B.build(str(tmp_path), pretrain_zh_chars=20000, pretrain_en_chars=10000, verbose=False, **SMALL)
    names = sorted(os.listdir(small))
    assert names == sorted(os.listdir(tmp_path)) and "README.md" in names
    for name in names:
        with open(os.path.join(small, name), "rb") as f, open(tmp_path / name, "rb") as g:
            assert f.read() == g.read(), name


def test_every_file_has_its_stage_format_and_requested_size(small):
    counts = {"pretrain_eval.jsonl": 20, "sft_mini_512.jsonl": 360, "sft_eval.jsonl": 40, "tool_eval.jsonl": 30, "dpo.jsonl": 200,
              "dpo_eval.jsonl": 40, "r1_mix_1024.jsonl": 200, "r1_eval.jsonl": 40, "lora_identity.jsonl": 100,
              "lora_identity_eval.jsonl": 20, "lora_medical.jsonl": 50, "rlaif.jsonl": 100, "rlaif_eval.jsonl": 20,
              "agent_rl.jsonl": 60}
    for stage, files in B.FILES.items():
        check = {"pretrain": check_pretrain, "dpo": check_dpo, "rlaif": check_rl_with_gt, "agent_rl": check_agent}.get(stage, check_sft)
        for name in files:
            recs = read(small, name)
            assert recs and all(check(r) is None for r in recs), name
            if name in counts:
                assert len(recs) == counts[name], name
    manifest = open(os.path.join(small, "README.md"), encoding="utf-8").read()
    assert "| sft_mini_512.jsonl | 360 |" in manifest and "People's Daily" in manifest


def test_agent_prompts_hold_the_tool_result_as_gt(small):
    """agent_rl: each line's gt is the result of the tool calls its reference reply was written from, and that reply
    holds it; about one in six needs no tool (gt [])."""
    recs = read(small, "agent_rl.jsonl")
    with_tool = [r for r in recs if r["gt"]]
    assert 0.7 * len(recs) < len(with_tool) < len(recs)
    for r in with_tool:
        (result,) = r["gt"]
        assert [m["role"] for m in r["conversations"]] == ["system", "user", "assistant"]
        assert result in r["conversations"][-1]["content"]


def test_eval_splits_never_overlap_training(small):
    for train, ev in TRAIN_EVAL:
        tr_lines = {json.dumps(r, ensure_ascii=False) for r in read(small, train)}
        assert not tr_lines & {json.dumps(r, ensure_ascii=False) for r in read(small, ev)}, ev
    pre_tr = {r["text"] for r in read(small, "pretrain_hq.jsonl")}
    assert not pre_tr & {r["text"] for r in read(small, "pretrain_eval.jsonl")}
    # no eval prompt is asked in ANY training file of any stage
    train_prompts = set().union(*(prompts(read(small, n)) for n in
                                  ["sft_mini_512.jsonl", "dpo.jsonl", "r1_mix_1024.jsonl", "lora_identity.jsonl", "lora_medical.jsonl",
                                   "rlaif.jsonl", "agent_rl.jsonl"]))
    for ev in ["sft_eval.jsonl", "dpo_eval.jsonl", "r1_eval.jsonl", "lora_identity_eval.jsonl", "rlaif_eval.jsonl"]:
        assert not prompts(read(small, ev)) & train_prompts, ev


def test_pretraining_mix_has_tool_transcripts_and_records_but_no_held_out_question(small):
    texts = [r["text"] for r in read(small, "pretrain_hq.jsonl")]
    transcripts = [t for t in texts if t.startswith("<|im_start|>user\n")]
    assert len(transcripts) == 60 and sum("<tool_call>" in t for t in transcripts) > 40  # some need no tool
    assert all("<tools>" not in t and t.endswith("<|im_end|>\n") for t in transcripts)  # no schemas: SFT teaches those
    for t in transcripts:  # every tool result in a transcript is what the real tool returns for that call
        for call, result in re.findall(r"<tool_call>\n(.+?)\n</tool_call>.*?<tool_response>\n(.+?)\n</tool_response>", t, re.S):
            assert run_tool_call(json.loads(call), TOOLS) == result
    records = [t for t in texts if t not in transcripts and re.search(r"的(编号|密码|电话|房间号|订单号|分数|日期|结果)是多少？|What is \w+'s", t)]
    assert len(records) == 30
    held_out = [m["content"] for n in ("tool_eval.jsonl", "r1_eval.jsonl", "rlaif_eval.jsonl")
                for r in read(small, n) for m in r["conversations"] if m["role"] == "user"]
    joined = "\n".join(texts)
    assert held_out and not any(q in joined for q in held_out)


def test_copy_drills_are_added_to_pretraining_and_change_nothing_else(small, tmp_path):
    """--pretrain_drills N (scripts/demo.py --smeared_keys): N documents of token strings each written twice."""
    B.build(str(tmp_path), stages=["pretrain"], pretrain_zh_chars=20000, pretrain_en_chars=10000, verbose=False,
            **dict(SMALL, pretrain_drills=25))
    plain = [r["text"] for r in read(small, "pretrain_hq.jsonl")]
    with_drills = [r["text"] for r in read(str(tmp_path), "pretrain_hq.jsonl")]
    drills = [t for t in with_drills if t not in set(plain)]
    assert sorted(set(with_drills) - set(drills)) == sorted(plain) and len(drills) == 25
    for doc in drills:
        for pair in doc.split("\n\n"):
            first, second = pair.split("\n")
            assert first == second and len(first) >= 8
    assert read(str(tmp_path), "pretrain_eval.jsonl") == read(small, "pretrain_eval.jsonl")  # held-out prose unchanged
    from dataset.lm_dataset import load_tokenizer
    tokenizer = load_tokenizer(os.path.join(B.ROOT, "model"))
    ids = {t for doc in drills for t in tokenizer.encode(doc)}
    assert not ids & (set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values()))


def test_identity_data(small):
    sft = read(small, "sft_mini_512.jsonl")
    text = json.dumps(sft, ensure_ascii=False)
    assert "MiniMind" in text and "小星" not in text and "XiaoXing" not in text  # base model never learns the new name
    new_name = re.compile("小星|XiaoXing")
    assert all(new_name.search(reply(r)) for r in read(small, "lora_identity.jsonl"))
    evals = read(small, "lora_identity_eval.jsonl")
    assert all(new_name.search(reply(r)) for r in evals)
    held_out = B.ID_ZH_EVAL + B.ID_EN_EVAL
    train_q = [r["conversations"][0]["content"] for r in read(small, "lora_identity.jsonl")]
    for r in evals:  # eval phrasings are never used for training
        q = r["conversations"][0]["content"]
        core = next(c for c in held_out if q.endswith(c))
        assert not any(t.endswith(core) for t in train_q), q


def test_sft_has_multi_turn_system_prompts_and_english(small):
    sft = read(small, "sft_mini_512.jsonl")
    assert sum(len(r["conversations"]) > 2 and r["conversations"][0]["role"] != "system" for r in sft) > 20
    assert sum(r["conversations"][0]["role"] == "system" for r in sft) > 20
    han = re.compile(r"[\u4e00-\u9fff]")
    english = sum(not han.search(reply(r)) and re.search(r"[A-Za-z]{3,}", reply(r)) is not None for r in sft)
    assert 0.1 < english / len(sft) < 0.4  # mostly Chinese, some English


def test_dpo_pairs_differ_checkably(small):
    for r in read(small, "dpo.jsonl") + read(small, "dpo_eval.jsonl"):
        c, rej = r["chosen"], r["rejected"]
        assert c[:-1] == rej[:-1] and c[-1]["role"] == rej[-1]["role"] == "assistant"
        good, bad = c[-1]["content"], rej[-1]["content"]
        assert good != bad and good[-1] in "。！？.!?\""
        m = re.fullmatch(r"(\d+) ([+\-×]) (\d+) = (\d+)[。.]", good)
        if m:  # arithmetic: chosen is right, a rejected result of the same form is wrong
            a, op, b, res = int(m[1]), m[2], int(m[3]), int(m[4])
            assert res == {"+": a + b, "-": a - b, "×": a * b}[op]
            mb = re.fullmatch(r"(\d+) ([+\-×]) (\d+) = (\d+)[。.]", bad)
            assert not mb or int(mb[4]) != res


R1 = re.compile(r"<think>\n(.+)\n</think>\n<answer>\n(-?\d+)\n</answer>", re.S)


def test_reasoning_template_and_answers(small):
    thinking_off = 0
    for name, want_reserved in (("r1_mix_1024.jsonl", False), ("r1_eval.jsonl", True)):
        for r in read(small, name):
            last = r["conversations"][-1]
            if last.get("reasoning_content") == "":  # a thinking-off sample: no steps, just the answer
                assert name == "r1_mix_1024.jsonl" and re.fullmatch(r"<answer>\n-?\d+\n</answer>", last["content"])
                thinking_off += 1
                continue
            m = R1.fullmatch(reply(r))
            assert m, reply(r)
            steps, answer = m[1], int(m[2])
            eqs = re.findall(r"(\d+) ([+\-×÷]) (\d+) = (\d+)", steps)
            for a, op, b, res in eqs:
                a, b, res = int(a), int(b), int(res)
                assert res == {"+": a + b, "-": a - b, "×": a * b, "÷": a // b}[op] and (op != "÷" or a % b == 0)
            assert int(eqs[-1][3]) == answer
            numbers = {int(x) for x in re.findall(r"\d+", r["conversations"][0]["content"])}
            assert bool(numbers & B.R1_EVAL_NUMBERS) == want_reserved  # eval uses numbers never seen in training
    assert abs(thinking_off / len(read(small, "r1_mix_1024.jsonl")) - B.THINKING_OFF_SHARE) < 0.1


def test_rlaif_prompts_carry_the_answer_and_hold_out_numbers(small):
    import random
    for name, want_reserved in (("rlaif.jsonl", False), ("rlaif_eval.jsonl", True)):
        for r in read(small, name):
            conv = r["conversations"]
            assert [m["role"] for m in conv] == ["user", "assistant"] and conv[1]["content"] == ""
            numbers = {int(x) for x in re.findall(r"\d+", conv[0]["content"])}
            assert bool(numbers & B.R1_EVAL_NUMBERS) == want_reserved
            assert re.fullmatch(r"-?\d+", r["gt"])
    # the ground truth is the problem's answer: the same draws give the reasoning data's <answer>
    rl_train, rl_eval = B.build_rlaif(random.Random(7), 30, 10)
    r1_train, r1_eval = B.build_r1(random.Random(7), 30, 10)
    for rl, r1 in zip(rl_train + rl_eval, r1_train + r1_eval):
        assert rl["conversations"][0] == r1["conversations"][0]
        assert re.search(r"<answer>\n(-?\d+)\n</answer>$", reply(r1))[1] == rl["gt"]  # thinking on or off


def test_medical_answers_are_short_and_cautious(small):
    for r in read(small, "lora_medical.jsonl"):
        assert len(reply(r)) < 120 and reply(r).endswith("。")


def test_ensure_demo_data_builds_only_when_missing(tmp_path):
    d = str(tmp_path)
    chat_only = dict(SMALL, sft=50, dpo=30, r1=30, lora_identity=20, lora_medical=10)
    B.ensure_demo_data(d, pretrain_zh_chars=4000, pretrain_en_chars=2000, verbose=False, **chat_only)
    assert not B.missing_files(d)
    stamp = os.stat(os.path.join(d, "sft_mini_512.jsonl")).st_mtime_ns
    B.ensure_demo_data(d, pretrain_zh_chars=4000, pretrain_en_chars=2000, verbose=False, **chat_only)
    assert os.stat(os.path.join(d, "sft_mini_512.jsonl")).st_mtime_ns == stamp  # untouched
    os.remove(os.path.join(d, "dpo_eval.jsonl"))
    B.ensure_demo_data(d, pretrain_zh_chars=4000, pretrain_en_chars=2000, verbose=False, **chat_only)
    assert os.path.exists(os.path.join(d, "dpo_eval.jsonl"))
    # asked with other flags (an older demo recipe's folder), it builds again, and the manifest says so
    stamp = os.stat(os.path.join(d, "sft_mini_512.jsonl")).st_mtime_ns
    B.ensure_demo_data(d, pretrain_zh_chars=4000, pretrain_en_chars=2000, verbose=False, **dict(chat_only, sft=60))
    assert os.stat(os.path.join(d, "sft_mini_512.jsonl")).st_mtime_ns != stamp
    assert "--sft 60" in open(os.path.join(d, "README.md"), encoding="utf-8").read()
    assert B.up_to_date(d, B.build_command(42, None, 4000, 2000, dict(chat_only, sft=60)))


def test_ensure_demo_data_builds_again_after_a_generator_change(tmp_path, monkeypatch):
    """A folder built by an older checkout (other generator code, tool schemas, tokenizer) is not reused."""
    d = str(tmp_path)
    sizes = dict(SMALL, sft=50, dpo=30, r1=30, lora_identity=20, lora_medical=10)
    B.ensure_demo_data(d, stages=["dpo"], verbose=False, **sizes)
    assert f"Generator: `{B.generator_fingerprint()}`" in open(os.path.join(d, "README.md"), encoding="utf-8").read()
    stamp = os.stat(os.path.join(d, "dpo.jsonl")).st_mtime_ns
    B.ensure_demo_data(d, stages=["dpo"], verbose=False, **sizes)
    assert os.stat(os.path.join(d, "dpo.jsonl")).st_mtime_ns == stamp  # same code: untouched
    monkeypatch.setattr(B, "generator_fingerprint", lambda: "0123456789abcdef")  # as after a `git pull`
    B.ensure_demo_data(d, stages=["dpo"], verbose=False, **sizes)
    assert os.stat(os.path.join(d, "dpo.jsonl")).st_mtime_ns != stamp
    assert "Generator: `0123456789abcdef`" in open(os.path.join(d, "README.md"), encoding="utf-8").read()


def test_default_sizes_are_reached(tmp_path):
    """Template pools must be big enough that the default line counts are really produced."""
    chat = [s for s in B.FILES if s != "pretrain"]
    out = B.build(str(tmp_path), stages=chat, verbose=False)
    for stage in chat:
        for name, key in zip(B.FILES[stage], (stage, stage + "_eval")):
            assert out[name] == B.SIZES[key] + (B.SIZES["sft_tools"] if key == "sft" else 0), name
    assert out["tool_eval.jsonl"] == B.SIZES["tool_eval"]


def test_tool_conversations_use_the_real_tools_and_eval_phrasings_are_unseen(small):
    from trainer.tools import TOOLS, run_tool_call
    train = [r["conversations"] for r in read(small, "sft_mini_512.jsonl") if r["conversations"][0].get("tools")]
    evals = [r["conversations"] for r in read(small, "tool_eval.jsonl")]
    assert len(train) == 60 and len(evals) == 30
    with_calls = 0
    for conv in train + evals:
        for i, m in enumerate(conv):
            if m.get("tool_calls"):
                with_calls += 1
                call = json.loads(m["tool_calls"])[0]["function"]
                # every tool result in the data is what the real tool returns for that call
                assert conv[i + 1]["role"] == "tool"
                assert conv[i + 1]["content"] == run_tool_call({"name": call["name"], "arguments": json.loads(call["arguments"])}, TOOLS)
                assert not conv[i + 1]["content"].startswith("error")
        final = conv[-1]
        assert final["role"] == "assistant" and not final.get("tool_calls")
        if conv[-2]["role"] == "tool":
            assert conv[-2]["content"] in final["content"]  # the answer holds the tool's result
    assert with_calls > 0.7 * len(train + evals)
    # eval offers all three tools, and asks its tool questions in phrasings no training line uses
    assert all(json.loads(c[0]["tools"]) == [t.schema for t in TOOLS.values()] for c in evals)
    question = lambda c: next(m["content"] for m in c if m["role"] == "user")  # noqa: E731
    train_qs = {question(c) for c in train}
    assert not train_qs & {question(c) for c in evals}
    for table in (B.CALC_Q_EVAL, B.UNITS_Q_EVAL, B.WEEKDAY_Q_EVAL, B.ADD_DAYS_Q_EVAL, B.BETWEEN_Q_EVAL):
        for qs in table.values():
            for q in qs:
                pattern = re.escape(q).replace(r"\{e\}", ".+").replace(r"\{v\}", ".+").replace(r"\{a\}", ".+") \
                    .replace(r"\{b\}", ".+").replace(r"\{d\}", ".+").replace(r"\{n\}", ".+")
                assert not any(re.fullmatch(pattern, t) for t in train_qs), q


class NextTokenRule(torch.nn.Module):
    """A stand-in model for the copy probe: predicts each next token by a fixed rule over the context."""

    def __init__(self, rule, vocab):
        super().__init__()
        self.rule, self.vocab = rule, vocab

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab)
        for b, row in enumerate(tokens.tolist()):
            for t in range(len(row)):
                logits[b, t, self.rule(row, t)] = 1.0
        return SimpleNamespace(logits=logits)


def test_copy_probe_scores_matching_the_context_not_a_fixed_look_back(small):
    from dataset.lm_dataset import load_tokenizer
    from scripts.demo_eval import copy_accuracy, copy_probe
    tokenizer = load_tokenizer(os.path.join(ROOT, "model"))
    probe = copy_probe(tokenizer, os.path.join(small, "pretrain_eval.jsonl"))
    tokens, mask = probe
    lengths = mask.sum(1) + 1
    assert 8 <= lengths.min() and lengths.max() <= 32 and len(set(lengths.tolist())) > 10
    for row, n in zip(tokens, lengths):
        assert torch.equal(row[-n:], row[-2 * n:-n]) and len(set(row[:-n].tolist())) == len(row) - n

    def induction(row, t):  # the token that followed the last earlier occurrence of the current one
        earlier = [j for j in range(t) if row[j] == row[t]]
        return row[earlier[-1] + 1] if earlier else 0

    look_back_20 = lambda row, t: row[t - 19] if t >= 19 else 0  # noqa: E731  (what one-length drills teach)
    vocab = len(tokenizer)
    assert copy_accuracy(NextTokenRule(induction, vocab), probe, "cpu") == 1.0
    assert copy_accuracy(NextTokenRule(look_back_20, vocab), probe, "cpu") < 0.1
