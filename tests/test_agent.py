"""Agent RL (train_agent.py): multi-turn episodes whose tool calls really run, the masks that keep tool results
out of the loss, the stored log-probs, the episode rewards, MiniMind-3's agent_rl.jsonl lines, and the script
end to end (resume = uninterrupted, 2-process gloo, one-line errors, loading the agent weights by name)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from test_train import TINY_FLAGS, assert_one_line_error, read_log, run, write_jsonl
from tiny_chat import CALCULATOR, HELLO, MATH, MATH_ANSWER, MATH_RESULT

from dataset.lm_dataset import AgentPromptDataset, DataFormatError, load_tokenizer, render_chat
from trainer.agent import Episode, agent_rollout, answer_reward, format_reward, tools_reward
from trainer.chat import assistant_message
from trainer.rollout import reply_logps
from trainer.tools import TOOLS
from trainer_utils import load_weights

WEATHER = {"type": "function", "function": {"name": "get_current_weather", "description": "获取天气",
                                            "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                                                           "required": ["location"]}}}


def agent_line(question, gt, tools=CALCULATOR, as_string=True, reference="(reference reply)"):
    """A line as MiniMind-3's agent_rl.jsonl has them: tools on the system message (a JSON string), the question,
    a reference reply (not used), and gt."""
    system = {"role": "system", "content": "", "tools": json.dumps(tools) if as_string else tools}
    return {"conversations": [system, {"role": "user", "content": question}, {"role": "assistant", "content": reference}],
            "gt": gt}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(os.path.join(ROOT, "model"))


@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("agent")
    write_jsonl(d / "agent_rl.jsonl", [agent_line(MATH, [MATH_RESULT]), agent_line(HELLO, [], tools=CALCULATOR + [WEATHER])] * 4)
    return d


def test_episode_runs_the_call_feeds_the_result_back_and_masks_it(tiny_chat_weight, tok, tmp_path):
    """The tiny chat model calls the calculator for MATH, reads 84 and answers. The episode's row is exactly what
    the chat template renders of that conversation; only the policy's tokens (its two replies with their end
    tokens) are in the mask, and their stored log-probs are those of a full forward over the row."""
    data = write_jsonl(tmp_path / "a.jsonl", [agent_line(MATH, [MATH_RESULT])])
    sample = AgentPromptDataset(data, tok, max_length=512)[0]
    model = load_weights(tiny_chat_weight).eval()
    torch.manual_seed(0)
    rollout, episodes = agent_rollout(model, tok, [sample], 2, TOOLS, max_turns=3, max_new_tokens=40, max_total_len=1024,
                                      temperature=0.3)
    for row, e in enumerate(episodes):
        assert e.stop == "answer" and e.calls == [("calculator", MATH_RESULT)] and e.text == MATH_ANSWER
        real = rollout.attention_mask[row].bool()
        assert e.messages == sample["messages"]  # what a reward model is shown: the prompt
        rendered = render_chat(tok, e.conversation + [assistant_message(e.turns[-1])], sample["tools"])
        assert tok.decode(rollout.input_ids[row][real]) + "\n" == rendered
        policy = rollout.reply_mask[row].bool()
        after = rollout.reply_ids[row]
        assert tok.decode(after[policy]) == e.turns[0] + "<|im_end|>" + e.turns[1] + "<|im_end|>"
        environment = after[~policy & real[rollout.prompt_len:]]
        assert tok.decode(environment) == f"\n<|im_start|>user\n<tool_response>\n{MATH_RESULT}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    logps, _ = reply_logps(model, rollout, temperature=0.3)
    assert torch.allclose(logps * rollout.reply_mask, rollout.old_logps, atol=1e-4)
    assert (rollout.old_logps[rollout.reply_mask == 0] == 0).all()


def test_episodes_stop_at_max_turns_and_max_total_len(tiny_chat_weight, tok, tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [agent_line(MATH, [MATH_RESULT])])
    sample = AgentPromptDataset(data, tok, max_length=512)[0]
    model = load_weights(tiny_chat_weight).eval()
    torch.manual_seed(0)
    _, (e,) = agent_rollout(model, tok, [sample], 1, TOOLS, max_turns=1, max_new_tokens=40, max_total_len=1024, temperature=0.3)
    assert e.stop == "turns" and not e.finished and e.calls == [("calculator", MATH_RESULT)] and answer_reward(e) == 0
    _, (e,) = agent_rollout(model, tok, [sample], 1, TOOLS, max_turns=3, max_new_tokens=40,
                            max_total_len=len(sample["prompt_ids"]) + 60, temperature=0.3)
    assert e.stop == "length" and not e.finished and len(e.turns) == 1
    _, (e,) = agent_rollout(model, tok, [sample], 1, {}, max_turns=3, max_new_tokens=40, max_total_len=1024, temperature=0.3)
    assert e.calls[0][0] == "calculator" and e.calls[0][1].startswith("error: unknown tool")  # the environment runs no tool
    assert tools_reward(e) == 0


def episode(text="", gt=(), calls=(), turns=None, finished=True):
    return Episode(messages=[], gt=list(gt), schemas=[], tools={}, prefix="", template_kwargs={}, ids=[],
                   turns=turns if turns is not None else [text], calls=list(calls), text=text,
                   stop="answer" if finished else "cut")


def test_episode_rewards():
    assert answer_reward(episode("结果是 84。", ["84"])) == 1.0
    assert answer_reward(episode("It is 84.0 in all", ["84"])) == 1.0  # numbers compare as numbers
    assert answer_reward(episode("结果是８４。", ["84"])) == 1.0  # full-width digits too
    assert answer_reward(episode("It is 184", ["84"])) == 0.0
    assert answer_reward(episode("那一天是2028-09-23 Saturday。", ["2028-09-23 saturday", "12"])) == 0.5
    assert answer_reward(episode("84", ["84"], finished=False)) == 0.0
    assert answer_reward(episode("84", [])) == 0.0
    assert tools_reward(episode(calls=[("calculator", "84"), ("units", "error: unknown unit")], gt=["84"])) == 0.5
    assert tools_reward(episode(gt=["84"])) == 0.0  # it should have called a tool
    assert tools_reward(episode(gt=[])) == 1.0  # nothing to look up: not calling is right
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>'
    assert format_reward(episode("2", turns=[call, "2"], calls=[("calculator", "2")])) == 1.0
    assert format_reward(episode("2", turns=[call, "2"], calls=[("calculator", "2")], finished=False)) == 0.0
    assert format_reward(episode("2", turns=["<tool_call>\n{}", "2"], calls=[("", "error: ...")])) == 0.0
    assert format_reward(episode("2", turns=["<think>\na\n</think>\n<think>\n</think>\n2"])) == 0.0


def test_agent_data_reads_minimind3_lines(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [agent_line(MATH, ["84"]), agent_line(HELLO, [], as_string=False),
                                              agent_line("x", "7")])
    ds = AgentPromptDataset(path, tok, max_length=512)
    a, b, c = ds[0], ds[1], ds[2]
    assert a["gt"] == ["84"] and b["gt"] == [] and c["gt"] == ["7"]
    assert [m["role"] for m in a["messages"]] == ["system", "user"]  # the reference reply is not in the prompt
    assert a["tools"] == CALCULATOR and b["tools"] == CALCULATOR
    assert tok.decode(a["prompt_ids"]).endswith(f"{MATH}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("line, problem", [
    ({"conversations": [{"role": "system", "content": "", "tools": "[{bad"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}], "gt": []}, "tools is a string but not valid JSON"),
    ({"conversations": [{"role": "user", "content": "q"}], "gt": ["1"]}, "no assistant message"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                        {"role": "assistant", "content": "b"}], "gt": ["1"]}, "does not end with a user or tool message"),
    ({**agent_line("q", ["1"]), "source": "web"}, '"source"'),
    (agent_line("q", {"a": 1}), '"gt" holds'),
])
def test_bad_agent_lines_are_one_line_errors(tmp_path, tok, line, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [agent_line("ok", ["1"]), line])
    with pytest.raises(DataFormatError, match="bad.jsonl:2") as e:
        AgentPromptDataset(path, tok, max_length=512)
    assert problem in str(e.value) and "\n" not in str(e.value)


AGENT_FLAGS = [*TINY_FLAGS, "--max_new_tokens", "40", "--num_generations", "4", "--batch_size", "2", "--learning_rate", "1e-3",
               "--temperature", "0.7", "--max_steps", "4"]


def test_agent_resume_matches_uninterrupted(tiny_chat_weight, agent_dir, tmp_path):
    """Also: the script warns about offered tools it cannot run, logs every number it promises, learns (the
    weights move) and writes the stage's weight file."""
    common = [*AGENT_FLAGS, "--from_weight", tiny_chat_weight, "--data_path", str(agent_dir / "agent_rl.jsonl"),
              "--rewards", "answer,tools,format,repetition,length", "--loss_type", "grpo"]
    proc = run("train_agent.py", *common, "--out_dir", str(tmp_path / "full"))
    assert "get_current_weather (4 prompts)" in proc.stdout + proc.stderr
    run("train_agent.py", *common, "--out_dir", str(tmp_path / "cut"), "--stop_at_step", "2")
    run("train_agent.py", *common, "--out_dir", str(tmp_path / "cut"), "--resume", "1")
    full, cut = read_log(tmp_path / "full", "agent_64.jsonl"), read_log(tmp_path / "cut", "agent_64.jsonl")
    assert len(full) == len(cut) == 4
    drop = lambda r: {k: v for k, v in r.items() if k != "eta_s" and "share" not in k}  # noqa: E731
    assert [drop(r) for r in full] == [drop(r) for r in cut]
    for key in ["reward", "reward_std", "reward_answer", "reward_tools", "reward_format", "reward_repetition", "reward_length",
                "kl", "clip_frac", "reply_len", "no_signal", "loss", "turns", "calls", "calls_ran", "answered"]:
        assert all(math.isfinite(r[key]) for r in full), key
    assert any(r["reward_answer"] > 0 for r in full) and any(r["calls_ran"] > 0 for r in full)
    final = torch.load(tmp_path / "full" / "agent_64.pth", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "agent_64.pth", weights_only=True)
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    start = torch.load(tiny_chat_weight, weights_only=True)
    assert any(not torch.equal(start[k], final[k]) for k in start)
    proc = run("eval_model.py", "--weight", "agent", "--out_dir", str(tmp_path / "full"), "--dim", "64", "--n_layers", "2",
               "--n_heads", "4", "--n_kv_heads", "2", "--device", "cpu", "--prompt", MATH, "--tools", "calculator",
               "--max_new_tokens", "40", "--temperature", "0")
    assert f"{tmp_path / 'full'}/agent_64.pth" in proc.stderr and "🤖" in proc.stdout


def test_agent_two_processes_gloo(tiny_chat_weight, agent_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29643",
                           os.path.join(ROOT, "train_agent.py"), *AGENT_FLAGS, "--max_steps", "2", "--out_dir", str(tmp_path),
                           "--from_weight", tiny_chat_weight, "--data_path", str(agent_dir / "agent_rl.jsonl")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert [r["step"] for r in read_log(tmp_path, "agent_64.jsonl")] == [1, 2]


def test_agent_script_errors_are_one_line(tiny_chat_weight, agent_dir, tmp_path):
    common = [*AGENT_FLAGS, "--out_dir", str(tmp_path), "--data_path", str(agent_dir / "agent_rl.jsonl")]
    proc = run("train_agent.py", *common, "--from_weight", tiny_chat_weight, "--tools", "weather", check=False)
    assert_one_line_error(proc, "--tools", "unknown tool(s) weather")
    proc = run("train_agent.py", *common, "--from_weight", tiny_chat_weight, "--max_total_len", "100", check=False)
    assert_one_line_error(proc, "--max_total_len 100")
    proc = run("train_agent.py", *common, "--rewards", "answer,speed", check=False)
    assert_one_line_error(proc, "unknown reward speed", "answer, tools, format, repetition, length, model")
    rl_prompts = write_jsonl(tmp_path / "rlaif.jsonl", [{"conversations": [{"role": "user", "content": MATH},
                                                                          {"role": "assistant", "content": ""}], "gt": "84"}] * 2)
    proc = run("train_agent.py", *common, "--from_weight", tiny_chat_weight, "--data_path", rl_prompts, "--max_steps", "1",
               "--out_dir", str(tmp_path / "rl"))
    assert "none of the 2 prompts offers tools" in proc.stdout + proc.stderr  # GRPO's data: it runs, and says so
    proc = run("train_agent.py", *common, check=False)  # no out/full_sft_64.pth in tmp_path
    assert_one_line_error(proc, "full_sft_64.pth", "train_full_sft.py")
    assert not os.path.exists(tmp_path / "agent_64.pth")
