"""eval_model.py end to end: tiny random checkpoints written into a temp out_dir with save_weights, the
script run as its own process (forked from a warm one: conftest.run_script), and once on a pseudo-terminal
as a fresh python. The runs are started together and every test waits for the ones it reads."""
import concurrent.futures
import hashlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_script
from eval_model import BOT, CHAT_PROMPTS, LORA_PROMPTS, PRETRAIN_PROMPTS, USER, get_args, load_model, prompt_ids
from model.model_lora import apply_lora, save_lora
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer_utils import save_weights
from trainer.tools import EXPRESSION_PATTERN, TOOLS, run_tool_call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MODES = ["pretrain", "full_sft", "rlhf", "reason"]
P = "请介绍一下自己。"
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", NO_COLOR="1")


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cmd(out_dir, *flags):
    """eval_model.py's flags for a run on the tiny checkpoints in out_dir."""
    return ["--out_dir", str(out_dir), "--dim", "64", "--n_layers", "2", "--device", "cpu", "--max_new_tokens", "8",
            *map(str, flags)]


def run(flags, stdin="", script="eval_model.py"):
    return run_script(script, *flags, stdin=stdin, env={"NO_COLOR": "1"})


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """out_dir with the four stage checkpoints, a lora_medical adapter and a save_pretrained folder, both of the reason model."""
    d = tmp_path_factory.mktemp("out")
    for i, prefix in enumerate(MODES):
        torch.manual_seed(i)
        model = MiniMindForCausalLM(MiniMindConfig(**TINY))
        save_weights(model, str(d / f"{prefix}_64.pth"))
    from transformers import AutoTokenizer
    model.save_pretrained(d / "hf")  # the last one: reason
    AutoTokenizer.from_pretrained(os.path.join(ROOT, "model")).save_pretrained(d / "hf")
    apply_lora(model, rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 1.0)  # a trained adapter is not zero
    (d / "lora").mkdir()
    save_lora(model, str(d / "lora" / "lora_medical_64.pth"))
    return d


def tty_session(args):
    """Run on a pseudo-terminal: answer the menu with 1, type hello, then Ctrl-C at the next prompt.
    Returns (exit code, everything shown)."""
    master, slave = pty.openpty()
    # Ctrl-C at its default, as a user's shell starts a program: a test run started in the background by a script
    # (`pytest &`) ignores SIGINT, and a child would inherit that and never see the Ctrl-C
    args = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
            "os.execv(sys.argv[1], sys.argv[1:])", sys.executable, os.path.join(ROOT, "eval_model.py"), *args]
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=ENV, close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(marker, count=1, wait=120):
        nonlocal seen
        deadline = time.time() + wait
        while seen.count(marker) < count and time.time() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break

    try:
        read_until(b"[1] manual input")
        os.write(master, b"1\n")
        read_until(USER.encode())
        os.write(master, b"hello\n")
        read_until(USER.encode(), 2)  # the reply is done and the next prompt is up
        time.sleep(1)  # let it block in input(): a signal just before the read would wait for the next key
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        read_until(b"\n", seen.count(b"\n") + 1, wait=30)  # keep draining: unread tty output delays the exit
        try:
            return proc.wait(timeout=30), seen.decode(errors="replace")
        except subprocess.TimeoutExpired:
            read_until(b"\n", seen.count(b"\n") + 1, wait=5)
            raise AssertionError(f"no exit 30 s after Ctrl-C; the terminal showed: {seen.decode(errors='replace')!r}")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


@pytest.fixture(scope="module")
def base_sha(out):
    return sha(out / "reason_64.pth")


@pytest.fixture(scope="module")
def runs(out, base_sha):
    """name -> a function waiting for that run's result; all runs start at once."""
    jobs = {}
    for mode in range(4):
        jobs[f"auto{mode}"] = (cmd(out, "--model_mode", mode), "0\n")
        jobs[f"manual{mode}"] = (cmd(out, "--model_mode", mode, *(["--temperature", 0] if mode == 3 else [])), "1\nhello\nhello\n")
    jobs["manual1_nostream"] = (cmd(out, "--model_mode", 1, "--stream", 0), "1\nhello\nhello\n")
    jobs["manual3_lora"] = (cmd(out, "--model_mode", 3, "--temperature", 0, "--lora_name", "lora_medical"), "1\nhello\nhello\n")
    jobs["manual3_hf"] = (cmd(out, "--model_mode", 3, "--temperature", 0, "--load", 1, "--model_path", out / "hf"), "1\nhello\nhello\n")
    # the same two runs in MiniMind-3's spelling, as its eval_llm.py takes them
    minimind3 = ["--save_dir", str(out), "--hidden_size", "64", "--num_hidden_layers", "2", "--device", "cpu",
                 "--max_new_tokens", "8", "--temperature", "0", "--historys", "0", "--show_speed", "1"]
    jobs["manual3_lora_minimind3"] = ([*minimind3, "--weight", "reason", "--lora_weight", "lora_medical"], "1\nhello\nhello\n", "eval_llm.py")
    jobs["manual3_hf_minimind3"] = ([*minimind3, "--load_from", str(out / "hf")], "1\nhello\nhello\n", "eval_llm.py")
    jobs["missing_ckpt"] = (cmd(out / "empty", "--model_mode", 3, "--prompt", "hi"), "")
    jobs["missing_lora"] = (cmd(out, "--model_mode", 2, "--lora_name", "lora_nope", "--prompt", "hi"), "")
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run, *job) for name, job in jobs.items()}
        futures["tty"] = pool.submit(tty_session, cmd(out, "--model_mode", 1))
        yield {name: f.result for name, f in futures.items()}


def ok(r):
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r.stdout


def turns(stdout):
    """[(prompt, reply), ...] from the transcript."""
    return [tuple(turn.split("\n" + BOT, 1)) for turn in re.split(f"^{USER}", stdout, flags=re.M)[1:]]


@pytest.mark.parametrize("mode", range(4))
def test_piped_auto_test(runs, mode):
    stdout = ok(runs[f"auto{mode}"]())
    prompts = PRETRAIN_PROMPTS if mode == 0 else CHAT_PROMPTS
    assert [p for p, _ in turns(stdout)] == prompts
    assert stdout.count(BOT) == len(prompts)


@pytest.mark.parametrize("mode", range(4))
def test_piped_manual_input_reseeds_every_reply(runs, mode):
    stdout = ok(runs[f"manual{mode}"]())
    (p1, r1), (p2, r2) = turns(stdout)
    assert p1 == p2 == "hello"
    assert r1 == r2  # seeded afresh (and sampled, except mode 3 which is greedy): no dependence on turn 1


def test_greedy_is_deterministic_across_runs_and_loaders(runs):
    # the reason weights again, as a save_pretrained folder, in another process: the same greedy text
    assert ok(runs["manual3_hf"]()) == ok(runs["manual3"]())


def test_minimind3_eval_llm_command_lines_give_the_same_replies(runs):
    for name in ("manual3_lora", "manual3_hf"):
        theirs = runs[f"{name}_minimind3"]()
        assert ok(theirs) == ok(runs[name]())
        assert theirs.stderr.count("[Speed]: ") == 2  # --show_speed 1: one line per reply


def test_stream_prints_the_same_text_as_no_stream(runs):
    assert ok(runs["manual1"]()) == ok(runs["manual1_nostream"]())


def test_lora_changes_output_and_leaves_base_file_alone(runs, out, base_sha):
    r = runs["manual3_lora"]()
    assert ok(r) != ok(runs["manual3"]())
    assert "lora_medical_64.pth" in r.stderr  # the model line says what was loaded
    assert sha(out / "reason_64.pth") == base_sha


def test_load_transformers_folder_uses_its_tokenizer(runs, out):
    assert f"model: {out / 'hf'}" in runs["manual3_hf"]().stderr


@pytest.mark.parametrize("name,file,script", [
    ("missing_ckpt", os.path.join("empty", "reason_64.pth"), "train_distill_reason.py"),
    ("missing_lora", os.path.join("lora", "lora_nope_64.pth"), "train_lora.py --lora_name lora_nope"),
])
def test_missing_file_is_one_line(runs, out, name, file, script):
    r = runs[name]()
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(out / file) in lines[0] and script in lines[0]


def test_terminal_menu_then_ctrl_c_exits_0(runs):
    rc, shown = runs["tty"]()
    assert rc == 0, shown
    assert "[0] auto test" in shown and "👶: hello" in shown and "🤖️: " in shown and "Traceback" not in shown


def test_prompt_format():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "model"))
    msgs = [{"role": "user", "content": "你好"}]
    assert prompt_ids(tok, msgs, pretrain=True) == [tok.bos_token_id] + tok.encode("你好", add_special_tokens=False)
    assert tok.decode(prompt_ids(tok, msgs, pretrain=False)) == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"


def test_flag_spellings():
    a = get_args(["--hidden_size", "768", "--num_hidden_layers", "16", "--use_moe", "true", "--max_seq_len", "80",
                  "--lora_name", "None", "--stream", "0"])
    assert (a.dim, a.n_layers, a.use_moe, a.max_new_tokens, a.lora_name, a.stream) == (768, 16, True, 80, None, False)
    a = get_args(["--save_dir", "runs", "--lora_weight", "lora_medical", "--open_thinking", "1", "--historys", "2",
                  "--load_from", "MiniMind2-Small", "--show_speed", "0"])  # MiniMind-3's eval_llm.py names
    assert (a.out_dir, a.lora_name, a.enable_thinking, a.history_cnt, a.load, a.model_path, a.show_speed) == (
        "runs", "lora_medical", True, 2, 1, "MiniMind2-Small", False)
    assert get_args(["--load_from", "model"]).load == 0  # MiniMind-3's default: the native weights
    assert set(LORA_PROMPTS) == {"lora_identity", "lora_medical"}


def test_inference_rope_scaling_switches_yarn_on(out):
    """MiniMind-3's --inference_rope_scaling: the loaded model's RoPE is YaRN-stretched from then on."""
    plain, _, _ = load_model(get_args(cmd(out, "--model_mode", 3)))
    yarn, _, what = load_model(get_args(cmd(out, "--model_mode", 3, "--inference_rope_scaling", 1)))
    assert "+ YaRN (" in what
    assert yarn.config.yarn_scaling["factor"] == 16 and plain.config.yarn_scaling is None
    x = torch.arange(3, 203).view(1, -1)
    with torch.no_grad():
        assert not torch.allclose(plain(x).logits, yarn(x).logits, atol=1e-4)
        assert torch.equal(plain(x).logits, load_model(get_args(cmd(out, "--model_mode", 3)))[0](x).logits)


def test_reason_reply_keeps_think_and_dims_it_on_a_terminal(capsys):
    """The reply text (and the history) keeps <think>...</think>; a terminal shows that part dimmed."""
    from transformers import AutoTokenizer
    from eval_model import DIM, RESET, reply, show
    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "model"))
    full = "<think>\n想一想\n</think>\n<answer>\n好的\n</answer>"

    class Scripted:  # stands in for a trained reason model
        def stream_generate(self, x, **kw):
            yield from tok.encode(full, add_special_tokens=False)

    args = get_args(["--model_mode", "3", "--device", "cpu"])
    assert reply(Scripted(), tok, [{"role": "user", "content": "hi"}], args) == full
    assert capsys.readouterr().out == BOT + full + "\n\n"
    style = {"color": True, "think": False}
    for piece in ["<think>", "\n想一想\n", "</think>", "\n<answer>\n好的\n</answer>"]:
        show(piece, style)
    assert capsys.readouterr().out == f"<think>{DIM}\n想一想\n{RESET}</think>\n<answer>\n好的\n</answer>"


# ----------------------------------------------------------------------------------------------------
# --tools and --enable_thinking, with the tiny chat model (tests/tiny_chat.py) that really calls the calculator
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tool_runs(tiny_chat_weight):
    base = ["--out_dir", os.path.dirname(tiny_chat_weight), "--dim", "64",
            "--n_layers", "2", "--device", "cpu", "--max_new_tokens", "60", "--temperature", "0"]
    jobs = {
        "tools": base + ["--tools", "calculator", "--prompt", "What is 12*7?", "--prompt", "Say hi"],
        "tools_nostream": base + ["--tools", "calculator", "--prompt", "What is 12*7?", "--stream", "0"],
        "limit": base + ["--tools", "calculator", "--prompt", "What is 12*7?", "--max_tool_rounds", "0"],
        "think_on": base + ["--enable_thinking", "1", "--prompt", "Think first"],
        "bad_tool": base + ["--tools", "calculator,weather", "--prompt", "hi"],
        "pretrain_tools": base + ["--model_mode", "0", "--tools", "all", "--prompt", "hi"],
    }
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(run, job) for name, job in jobs.items()}
        yield {name: f.result for name, f in futures.items()}


CALL_TEXT = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>'


def test_tools_run_the_call_and_the_model_answers_with_the_result(tool_runs):
    stdout = ok(tool_runs["tools"]())
    assert stdout == (f"{USER}What is 12*7?\n{BOT}{CALL_TEXT}\n\n"
                      f'🔧 calculator {{"expression": "12*7"}} -> 84\n\n'
                      f"{BOT}12*7 = 84.\n\n"
                      f"{USER}Say hi\n{BOT}Hi! I am a tiny model.\n\n")
    assert ok(tool_runs["tools_nostream"]()) == stdout.split(f"{USER}Say hi")[0]
    assert "tools: calculator" in tool_runs["tools"]().stderr


def test_tool_round_limit_is_said(tool_runs):
    stdout = ok(tool_runs["limit"]())
    assert stdout.count(BOT) == 1 and "-> 84" in stdout  # the call still runs, the model is not asked again
    assert "raise --max_tool_rounds" in stdout


def test_enable_thinking_prefills_the_think_block(tool_runs):
    assert ok(tool_runs["think_on"]()) == f"{USER}Think first\n{BOT}<think>\nLet me think.\n</think>\n<answer>\nThe answer is 42.\n</answer>\n\n"


def test_calls_are_guided_into_well_formed_json_unless_turned_off(broken_call_weight):
    """The model learned a call that is not JSON; by default the guide (trainer/tool_guide.py) makes it write a
    call the runner can check, and --guided_tool_calls 0 shows what it writes when left free."""
    from tiny_chat import BROKEN, BROKEN_REPLY
    base = ["--out_dir", os.path.dirname(broken_call_weight), "--dim", "64",
            "--n_layers", "2", "--device", "cpu", "--max_new_tokens", "40", "--temperature", "0", "--tools", "calculator",
            "--prompt", BROKEN, "--max_tool_rounds", "0", "--stream", "0"]
    free = ok(run(base + ["--guided_tool_calls", "0"]))
    assert free.startswith(f"{USER}{BROKEN}\n{BOT}{BROKEN_REPLY}\n") and "🔧 (not a call)" in free
    guided = ok(run(base))
    block = guided.split("<tool_call>", 1)[1].split("</tool_call>", 1)[0]
    call = json.loads(block)
    assert call["name"] == "calculator" and list(call["arguments"]) == ["expression"]
    # what the model wrote, until the expression's pattern refused its comma
    assert call["arguments"]["expression"].startswith("6") and re.fullmatch(EXPRESSION_PATTERN, call["arguments"]["expression"])
    result = run_tool_call(call, TOOLS)
    assert f"🔧 calculator {json.dumps(call['arguments'], ensure_ascii=False)} -> {result}" in guided


@pytest.mark.parametrize("name,words", [("bad_tool", "unknown tool(s) weather"), ("pretrain_tools", "--tools needs a chat model")])
def test_bad_tool_flags_are_one_line(tool_runs, name, words):
    r = tool_runs[name]()
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and words in r.stderr and r.stderr.startswith("error: ")
