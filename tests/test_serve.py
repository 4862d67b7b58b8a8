"""scripts/serve_openai_api.py: a real server process, talked to with the official openai client."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from scripts.serve_openai_api import ReplySplitter
from trainer_utils import load_weights, save_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "model")
MAX_SEQ_LEN = 256
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
PROMPTS = ["你好，请介绍一下你自己。", "Write one sentence about the sea."]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    assert os.path.exists(os.path.join(TOKENIZER, "tokenizer.json")), "model/tokenizer.json missing: run train_tokenizer.py"
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY, vocab_size=len(tokenizer)))
    weight = str(out / "full_sft_64.pth")
    save_weights(model, weight)
    port = free_port()
    log = open(out / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "serve_openai_api.py"), "--weight", weight,
                             "--tokenizer_path", TOKENIZER, "--port", str(port), "--device", "cpu",
                             "--max_seq_len", str(MAX_SEQ_LEN), "--served_model_name", "tiny"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=str(out))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                log.seek(0)
                pytest.fail(f"server did not answer /v1/models within 120 s:\n{log.read()[-3000:]}")
            time.sleep(0.3)
        yield {"base": base, "weight": weight, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server["base"] + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def native(server):
    return load_weights(server["weight"]).eval()


def chat(text):
    return [{"role": "user", "content": text}]


def native_reply(native, tokenizer, messages, max_tokens):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = list(native.stream_generate(torch.tensor([ids]), max_new_tokens=max_tokens, temperature=0))
    return tokenizer.decode(out, skip_special_tokens=True), len(ids), len(out)


def streamed(client, messages, max_tokens, chunks=None):
    content, reasoning = [], []
    for chunk in client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=max_tokens, stream=True):
        if chunks is not None:
            chunks.append(chunk)
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        reasoning.append(getattr(delta, "reasoning_content", None) or "")
    return "".join(content), "".join(reasoning)


def test_models_endpoint(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_non_streaming_reply_is_the_native_greedy_reply(client, native, tokenizer):
    want, n_prompt, n_out = native_reply(native, tokenizer, chat(PROMPTS[0]), 40)
    assert not want.lstrip().startswith("<think>")  # a plain reply: content is the text verbatim
    r = client.chat.completions.create(model="tiny", messages=chat(PROMPTS[0]), temperature=0, max_tokens=40)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == ("length" if n_out == 40 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, n_out, n_prompt + n_out)


def test_streamed_deltas_concatenate_to_the_non_streaming_reply(client):
    full = client.chat.completions.create(model="tiny", messages=chat(PROMPTS[1]), temperature=0, max_tokens=40)
    chunks = []
    content, reasoning = streamed(client, chat(PROMPTS[1]), 40, chunks)
    assert content == full.choices[0].message.content and content
    assert reasoning == (getattr(full.choices[0].message, "reasoning_content", None) or "")
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_concurrent_streams_each_get_their_own_text(client):
    want = [client.chat.completions.create(model="tiny", messages=chat(p), temperature=0, max_tokens=60).choices[0].message.content
            for p in PROMPTS]
    assert want[0] != want[1]
    got, errors = [None, None], []
    barrier = threading.Barrier(2)

    def run(i):
        try:
            barrier.wait()
            got[i] = streamed(client, chat(PROMPTS[i]), 60)[0]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert got == want


def post(base, body, content_type="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body,param", [
    (b'{"messages": [{"role": "user", "content": "hi"}', None),           # bad JSON
    ({"temperature": 0}, "messages"),                                      # missing messages
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_SEQ_LEN}, "max_tokens"),
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**64}, "seed"),               # not a 64-bit seed
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -2**63 - 1}, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 1.5}, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": float("nan")}, "temperature"),  # NaN / Infinity literals
    ({"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": -1}, "top_k"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),           # a lone surrogate
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages.0.content.0.text"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": 5}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["\n"]}, "stop"),               # typed right, not implemented
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": MAX_SEQ_LEN}, "max_completion_tokens"),
    ([{"role": "user", "content": "hi"}], None),                                              # not an object
])
def test_invalid_requests_get_400_with_openai_error(server, body, param):
    status, err = post(server["base"], body)
    assert status == 400, err
    assert err["error"]["type"] == "invalid_request_error" and isinstance(err["error"]["message"], str)
    assert err["error"]["param"] == param


@pytest.mark.parametrize("body", [
    {"temperature": 1e-300},  # so close to greedy that a plain logits / temperature overflows to NaN
    {"temperature": 0.5, "repetition_penalty": 1e-300},
    {"seed": 2**64 - 1, "temperature": 1.0},
    {"stop": None, "logprobs": False, "presence_penalty": 0, "response_format": {"type": "text"}, "user": "u1"},  # "off" values
])
def test_extreme_but_valid_requests_are_answered(server, body):
    status, r = post(server["base"], {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
    assert status == 200, r
    assert r["choices"][0]["message"]["role"] == "assistant"


def test_openai_client_sees_400_for_a_seed_beyond_64_bits(client):
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=chat("hi"), seed=2**64)
    assert e.value.status_code == 400 and e.value.body["param"] == "seed"


def test_openai_client_sees_bad_request(client):
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    assert e.value.status_code == 400


def test_long_history_keeps_the_most_recent_messages_that_fit(client, native, tokenizer):
    old = [{"role": "system", "content": "你是一个助手。"}]
    for i in range(12):
        old += [{"role": "user", "content": f"第{i}个问题：" + "天气很好" * 10},
                {"role": "assistant", "content": "好的。" * 10}]
    messages = old + chat(PROMPTS[0])
    max_tokens = 32
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=max_tokens)
    assert r.usage.prompt_tokens <= MAX_SEQ_LEN - max_tokens
    # the kept prompt is the system message plus the longest recent tail starting at a user message
    kept = None
    for start in range(1, len(messages), 2):
        candidate = messages[:1] + messages[start:]
        n = len(tokenizer.apply_chat_template(candidate, add_generation_prompt=True, tokenize=True, return_dict=False))
        if n <= MAX_SEQ_LEN - max_tokens:
            kept = candidate
            break
    assert kept is not None and len(kept) < len(messages)
    want, n_prompt, _ = native_reply(native, tokenizer, kept, max_tokens)
    assert r.usage.prompt_tokens == n_prompt and r.choices[0].message.content == want


def test_prompt_too_long_for_even_the_last_message(server):
    status, err = post(server["base"], {"messages": chat("天气很好，" * 200), "max_tokens": 16})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded", err


# ----------------------------------------------------------------------------------------------------
# reasoning replies (no server needed)
# ----------------------------------------------------------------------------------------------------
def split(pieces):
    s = ReplySplitter()
    out = [d for p in pieces for d in s.feed(p)] + s.finish()
    return ("".join(t for f, t in out if f == "reasoning_content"), "".join(t for f, t in out if f == "content"),
            s.reasoning)


@pytest.mark.parametrize("text,want", [
    ("<think>\n先算 1+1。\n</think>\n<answer>\n等于 2。\n</answer>", ("先算 1+1。", "等于 2。", True)),
    ("<think>\nhmm\n</think>\nplain answer without tags", ("hmm", "plain answer without tags", True)),
    ("<think>\nstill thinking", ("still thinking", "", True)),
    ("  hello <think> not a reasoning reply\n", ("", "  hello <think> not a reasoning reply\n", False)),
    ("<thin", ("", "<thin", False)),
    ("", ("", "", False)),
])
def test_reasoning_split_is_the_same_streamed_or_whole(text, want, tokenizer):
    assert split([text]) == want
    assert split(list(text)) == want  # character by character
    from model.model_minimind import stream_text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert split(stream_text(tokenizer, ids)) == want  # token by token, as the server streams


def test_model_path_serves_a_transformers_folder(tmp_path, server, native, tokenizer):
    from scripts.convert_model import export_transformers
    from scripts.serve_openai_api import build_parser, load_engine
    export_transformers(native, str(tmp_path / "hf"), TOKENIZER)
    engine = load_engine(build_parser().parse_args(["--model_path", str(tmp_path / "hf"), "--device", "cpu"]))
    assert engine.name == "minimind-hf"
    ids = torch.tensor([tokenizer.apply_chat_template(chat(PROMPTS[1]), add_generation_prompt=True, tokenize=True, return_dict=False)])
    assert list(engine.model.stream_generate(ids, max_new_tokens=20, temperature=0)) == \
        list(native.stream_generate(ids, max_new_tokens=20, temperature=0))
