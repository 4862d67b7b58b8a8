"""scripts/serve_openai_api.py: a real server process, talked to with the official openai client."""
import json
import os
import threading
import urllib.error
import urllib.request

import pytest
import torch

from conftest import TOKENIZER, serve_process
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from scripts.serve_openai_api import ReplySplitter
from trainer_utils import load_weights, save_weights

MAX_SEQ_LEN = 256
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
PROMPTS = ["你好，请介绍一下你自己。", "Write one sentence about the sea."]


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
    with serve_process(str(out), "--weight", weight, "--max_seq_len", MAX_SEQ_LEN, "--served_model_name", "tiny") as running:
        yield {**running, "weight": weight}


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
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object", "schema": {}}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": "json"}, "response_format"),
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


# ----------------------------------------------------------------------------------------------------
# tools and thinking, against the tiny chat model (tests/tiny_chat.py) that really emits a tool call
# ----------------------------------------------------------------------------------------------------
from tiny_chat import (CALCULATOR, HELLO, HELLO_REPLY, MATH, MATH_ANSWER, MATH_CALL, MATH_RESULT, THINK,  # noqa: E402
                       THINK_ANSWER, THINK_REASONING)


@pytest.fixture(scope="module")
def tool_client(chat_server):
    from openai import OpenAI
    return OpenAI(base_url=chat_server["base"] + "/v1", api_key="x", max_retries=0, timeout=120)


def test_tool_round_trip_with_the_openai_client(tool_client):
    """request with tools -> tool_calls -> the client runs the call -> tool message -> the answer."""
    from trainer.tools import run_tool_call, select_tools
    messages = chat(MATH)
    r = tool_client.chat.completions.create(model="tiny-chat", messages=messages, tools=CALCULATOR, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None  # the raw <tool_call> text is not content
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == MATH_CALL
    result = run_tool_call({"name": call.function.name, "arguments": call.function.arguments}, select_tools("calculator"))
    assert result == MATH_RESULT
    messages += [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": result}]
    r2 = tool_client.chat.completions.create(model="tiny-chat", messages=messages, tools=CALCULATOR, temperature=0)
    assert r2.choices[0].message.content == MATH_ANSWER and r2.choices[0].finish_reason == "stop"
    assert not r2.choices[0].message.tool_calls


def stream_chunks(client, **request):
    return list(client.chat.completions.create(model="tiny-chat", temperature=0, stream=True, **request))


def test_streamed_tool_round_trip(tool_client, chat_server):
    chunks = stream_chunks(tool_client, messages=chat(MATH), tools=CALCULATOR)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert all(not d.content for d in deltas)  # the call is never streamed as text
    pieces = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert pieces and all(tc.index == 0 for tc in pieces)
    first, rest = pieces[0], pieces[1:]
    assert first.id.startswith("call_") and first.type == "function" and first.function.name == "calculator"
    assert all(tc.id is None and not (tc.function and tc.function.name) for tc in rest)  # id/type/name only in the first
    arguments = "".join(tc.function.arguments or "" for tc in pieces)
    assert json.loads(arguments) == MATH_CALL
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    # the same as the non-streamed reply, and the raw stream ends with [DONE]
    full = tool_client.chat.completions.create(model="tiny-chat", messages=chat(MATH), tools=CALCULATOR, temperature=0)
    assert full.choices[0].message.tool_calls[0].function.arguments == arguments
    status, lines = raw_stream(chat_server["base"], {"messages": chat(MATH), "tools": CALCULATOR, "temperature": 0, "stream": True})
    assert status == 200 and lines[-1] == "data: [DONE]"
    assert not any("<tool_call>" in line for line in lines)

    history = chat(MATH) + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": first.id, "type": "function", "function": {"name": "calculator", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": first.id, "content": MATH_RESULT}]
    answer = stream_chunks(tool_client, messages=history, tools=CALCULATOR)
    assert "".join(c.choices[0].delta.content or "" for c in answer if c.choices) == MATH_ANSWER
    assert answer[-1].choices[0].finish_reason == "stop"


@pytest.fixture(scope="module")
def broken_client(tmp_path_factory, broken_call_weight):
    """A server on the tiny model that learned a call which is not JSON (tests/tiny_chat.py BROKEN_REPLY)."""
    from openai import OpenAI
    with serve_process(str(tmp_path_factory.mktemp("broken_server")), "--weight", broken_call_weight,
                       "--max_seq_len", 1024, "--served_model_name", "broken") as server:
        yield OpenAI(base_url=server["base"] + "/v1", api_key="x", max_retries=0, timeout=120)


def test_client_tools_are_guided_into_a_call_the_client_can_run(broken_client):
    """Left free this model writes a call that is not JSON (the client would get it as text); the server guides
    the block, so the client gets a tool call whose arguments parse and fit the calculator's schema."""
    from tiny_chat import BROKEN
    r = broken_client.chat.completions.create(model="broken", messages=chat(BROKEN), tools=CALCULATOR, temperature=0,
                                              max_tokens=100)
    # off its track (the pattern ends its expression early), the model goes on writing after the call: that text
    # is content, as any server returns it, but no tag of the call is in it (nor a stray </tool_call>: the guide)
    content = r.choices[0].message.content or ""
    assert r.choices[0].finish_reason == "tool_calls" and "<tool_call>" not in content and "</tool_call>" not in content
    calls = r.choices[0].message.tool_calls
    assert all(c.function.name == "calculator" and list(json.loads(c.function.arguments)) == ["expression"] for c in calls)
    assert json.loads(calls[0].function.arguments)["expression"].startswith("6")  # the pattern refused its comma
    chunks = list(broken_client.chat.completions.create(model="broken", messages=chat(BROKEN), tools=CALCULATOR,
                                                        temperature=0, max_tokens=100, stream=True))
    pieces = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [json.loads("".join(tc.function.arguments or "" for tc in pieces if tc.index == i)) for i in range(len(calls))] == \
        [json.loads(c.function.arguments) for c in calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    free = broken_client.chat.completions.create(model="broken", messages=chat(BROKEN), temperature=0, max_tokens=40)
    assert not free.choices[0].message.tool_calls  # without tools nothing is guided (nor parsed as a call)
    # parallel_tool_calls false: one call at most. Offered the calculator without its pattern, this model writes
    # two calls (off its track, it opens a second block after the first)
    plain = json.loads(json.dumps(CALCULATOR))
    del plain[0]["function"]["parameters"]["properties"]["expression"]["pattern"]
    two, one = (broken_client.chat.completions.create(model="broken", messages=chat(BROKEN), tools=plain, temperature=0,
                                                      max_tokens=100, **kw).choices[0].message.tool_calls
                for kw in ({}, {"parallel_tool_calls": False}))
    assert len(two) == 2 and [c.function.arguments for c in one] == [two[0].function.arguments]


@pytest.mark.parametrize("prompt,response_format,check", [
    (MATH, {"type": "json_object"}, lambda v: isinstance(v, dict)),
    (THINK, {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {
        "type": "object", "properties": {"answer": {"type": "integer"}, "why": {"type": "string"}}, "required": ["answer"]}}},
     lambda v: isinstance(v["answer"], int) and set(v) <= {"answer", "why"}),
])
def test_response_format_makes_the_reply_json_the_schema_allows(tool_client, prompt, response_format, check):
    """The tiny model never learned JSON replies; guided, what it writes is still one JSON value of the schema."""
    r = tool_client.chat.completions.create(model="tiny-chat", messages=chat(prompt), temperature=0, max_tokens=100,
                                            response_format=response_format)
    assert r.choices[0].finish_reason == "stop"
    assert check(json.loads(r.choices[0].message.content))


def raw_stream(base, body):
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, [line for line in r.read().decode().splitlines() if line]


def test_thinking_on_starts_inside_the_think_block(tool_client):
    """enable_thinking true pre-fills <think>\\n: the reply has no opening tag, yet reasoning_content is split off."""
    for extra in ({"enable_thinking": True}, {"chat_template_kwargs": {"enable_thinking": True}},
                  {"chat_template_kwargs": {"open_thinking": True}}):
        r = tool_client.chat.completions.create(model="tiny-chat", messages=chat(THINK), temperature=0, extra_body=extra)
        assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (THINK_REASONING, THINK_ANSWER), extra
        chunks = stream_chunks(tool_client, messages=chat(THINK), extra_body=extra)
        streamed = [(getattr(c.choices[0].delta, "reasoning_content", None) or "", c.choices[0].delta.content or "")
                    for c in chunks if c.choices]
        assert ("".join(r for r, _ in streamed), "".join(c for _, c in streamed)) == (THINK_REASONING, THINK_ANSWER)


def test_thinking_off_prefills_an_empty_think_block(tool_client, tiny_chat_weight, tokenizer):
    from dataset.lm_dataset import render_chat
    prompt = render_chat(tokenizer, chat(THINK), add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    model = load_weights(tiny_chat_weight).eval()
    out = list(model.stream_generate(torch.tensor([ids]), max_new_tokens=40, temperature=0, eos_token_id=tokenizer.eos_token_id))
    splitter = ReplySplitter(start="answer")
    want = "".join(t for _, t in splitter.feed(tokenizer.decode(out, skip_special_tokens=True)) + splitter.finish())
    r = tool_client.chat.completions.create(model="tiny-chat", messages=chat(THINK), temperature=0, max_tokens=40,
                                            extra_body={"enable_thinking": False})
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(out)
    assert r.choices[0].message.content == want
    assert getattr(r.choices[0].message, "reasoning_content", None) is None  # the answer is content


def test_tool_choice_none_leaves_the_tools_out(tool_client, tokenizer):
    r = tool_client.chat.completions.create(model="tiny-chat", messages=chat(MATH), tools=CALCULATOR, tool_choice="none",
                                            temperature=0, max_tokens=30)
    n = len(tokenizer.apply_chat_template(chat(MATH), add_generation_prompt=True, tokenize=True, return_dict=False))
    assert r.usage.prompt_tokens == n and r.choices[0].finish_reason != "tool_calls" and not r.choices[0].message.tool_calls
    auto = tool_client.chat.completions.create(model="tiny-chat", messages=chat(MATH), tools=CALCULATOR, tool_choice="auto",
                                               temperature=0)
    assert auto.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "calculator"}}])
def test_tool_choice_required_or_named_makes_the_reply_a_call(tool_client, tool_choice):
    """The model answers HELLO in plain words even with tools offered; tool_choice "required" (or naming the
    function) makes the reply open a call, which the guide keeps well-formed."""
    auto = tool_client.chat.completions.create(model="tiny-chat", messages=chat(HELLO), tools=CALCULATOR, temperature=0)
    assert auto.choices[0].message.content == HELLO_REPLY and not auto.choices[0].message.tool_calls
    r = tool_client.chat.completions.create(model="tiny-chat", messages=chat(HELLO), tools=CALCULATOR, temperature=0,
                                            tool_choice=tool_choice, max_tokens=60)
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "calculator" and list(json.loads(call.function.arguments)) == ["expression"]


def test_server_tools_runs_the_calls_for_the_page(tool_client):
    """The page's mode: the server runs the call and sends every message of the turn."""
    r = tool_client.chat.completions.create(model="tiny-chat", messages=chat(MATH), temperature=0,
                                            extra_body={"server_tools": True})
    choice = r.model_dump()["choices"][0]
    call_message, tool_message, answer = choice["messages"]
    [call] = call_message["tool_calls"]
    assert call["function"]["name"] == "calculator" and json.loads(call["function"]["arguments"]) == MATH_CALL
    assert tool_message == {"role": "tool", "tool_call_id": call["id"], "name": "calculator", "content": MATH_RESULT}
    assert answer == {"role": "assistant", "content": MATH_ANSWER} and choice["finish_reason"] == "stop"
    assert {k: v for k, v in choice["message"].items() if v is not None} == answer  # `message` is the last one

    deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in stream_chunks(
        tool_client, messages=chat(MATH), extra_body={"server_tools": True}) if c.choices]
    roles = [d["role"] for d in deltas if "role" in d]
    assert roles == ["assistant", "tool", "assistant"]
    tool_delta = next(d for d in deltas if d.get("role") == "tool")
    first_call = next(d["tool_calls"][0] for d in deltas if "tool_calls" in d)
    assert tool_delta["tool_call_id"] == first_call["id"] and tool_delta["content"] == MATH_RESULT
    after = deltas[deltas.index(tool_delta) + 1:]
    assert "".join(d.get("content", "") for d in after) == MATH_ANSWER


def test_models_entry_describes_the_model(chat_server, tiny_chat_weight):
    from model.model_minimind import count_parameters
    with urllib.request.urlopen(chat_server["base"] + "/v1/models") as r:
        [entry] = json.loads(r.read())["data"]
    assert entry["id"] == "tiny-chat" and entry["stage"] == "full_sft" and entry["lora"] is None
    assert entry["parameters"] == count_parameters(load_weights(tiny_chat_weight))
    assert (entry["hidden_size"], entry["num_hidden_layers"], entry["use_moe"]) == (64, 2, False)
    assert entry["tools"] == ["calculator"] and entry["max_seq_len"] == 2048 and entry["raw_prompt"] is False


def test_server_prints_and_serves_the_chat_page(chat_server):
    port = chat_server["base"].rsplit(":", 1)[1]
    with open(chat_server["log"], encoding="utf-8") as f:
        assert f"chat page: http://127.0.0.1:{port}/" in f.read()
    with urllib.request.urlopen(chat_server["base"] + "/") as r:
        html = r.read().decode()
        assert r.headers["content-type"].startswith("text/html") and '<script src="/web/app.js">' in html
    for asset, kind in [("app.js", "javascript"), ("style.css", "text/css")]:
        with urllib.request.urlopen(chat_server["base"] + "/web/" + asset) as r:
            assert kind in r.headers["content-type"]
            assert "cdn" not in r.read().decode().lower()  # everything is served from here


CALL = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'}}


@pytest.mark.parametrize("body,param", [
    ({"tools": "calculator"}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "not a name!"}}]}, "tools.0.function.name"),
    ({"tools": CALCULATOR, "tool_choice": "any"}, "tool_choice"),
    ({"tools": CALCULATOR, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "tools": CALCULATOR}, "response_format"),
    ({"response_format": {"type": "json_object"}, "enable_thinking": True}, "response_format"),
    ({"tools": CALCULATOR, "tool_choice": {"type": "function", "function": {"name": "weather"}}}, "tool_choice"),
    ({"tools": CALCULATOR, "tool_choice": {"type": "function", "name": "calculator"}}, "tool_choice"),
    ({"server_tools": True, "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"enable_thinking": "yes"}, "enable_thinking"),
    ({"enable_thinking": 1}, "enable_thinking"),
    ({"chat_template_kwargs": {"enable_thinking": "true"}}, "chat_template_kwargs.enable_thinking"),
    ({"chat_template_kwargs": {"add_vision_id": True}}, "chat_template_kwargs.add_vision_id"),
    ({"enable_thinking": True, "chat_template_kwargs": {"enable_thinking": False}}, "enable_thinking"),
    ({"server_tools": "yes"}, "server_tools"),
    ({"server_tools": True, "tools": CALCULATOR}, "tools"),
    ({"messages": [{"role": "user", "content": "1+1?"}, {"role": "tool", "content": "2"}]}, "messages.1.tool_call_id"),
    ({"messages": [{"role": "user", "content": "1+1?"}, {"role": "tool", "content": "2", "tool_call_id": "call_1"}]}, "messages.1"),
    ({"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "tool_calls": [CALL]},
                   {"role": "tool", "content": "2", "tool_call_id": "call_9"}]}, "messages.2.tool_call_id"),
    ({"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "tool_calls": [CALL]},
                   {"role": "tool", "content": "2", "tool_call_id": "call_1"}, {"role": "tool", "content": "2", "tool_call_id": "call_1"}]},
     "messages.3.tool_call_id"),
    ({"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "tool_calls": [CALL]},
                   {"role": "user", "content": "well?"}]}, "messages.2"),
    ({"messages": [{"role": "user", "content": "1+1?", "tool_calls": [CALL]}]}, "messages.0.tool_calls"),
    ({"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": None}]}, "messages.1.content"),
    ({"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "tool_calls": [{"type": "function",
      "function": CALL["function"]}]}, {"role": "tool", "content": "2", "tool_call_id": "call_1"}]}, "messages.1.tool_calls.0.id"),
    ({"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "tool_calls": []}]}, "messages.1.tool_calls"),
    ({"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "tool_calls": [{**CALL, "function": {
      "name": "calculator", "arguments": 2}}]}, {"role": "tool", "content": "2", "tool_call_id": "call_1"}]},
     "messages.1.tool_calls.0.function.arguments"),
    ({"tools": CALCULATOR, "tool_choice": 1}, "tool_choice"),
])
def test_invalid_tool_and_thinking_fields_get_400(chat_server, body, param):
    status, err = post(chat_server["base"], {"messages": chat(MATH), **body})
    assert status == 400, err
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param, err
    assert err["error"]["message"].startswith(param), err


def test_server_tools_needs_a_server_started_with_tools(server):
    status, err = post(server["base"], {"messages": chat("hi"), "server_tools": True})
    assert status == 400 and err["error"]["param"] == "server_tools" and "--tools" in err["error"]["message"], err


def test_tool_messages_are_paired_with_calls_in_the_calls_order():
    """Results given in another order than the calls are put in the calls' order (the template pairs them by position)."""
    from scripts.serve_openai_api import ChatMessage, template_messages
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": "calculator", "arguments": f'{{"expression":"{i}+{i}"}}'}}
             for i in range(3)]
    messages = [ChatMessage(**m) for m in [{"role": "user", "content": "sums?"}, {"role": "assistant", "content": None, "tool_calls": calls},
                                           *[{"role": "tool", "content": str(2 * i), "tool_call_id": f"call_{i}"} for i in (2, 0, 1)],
                                           {"role": "user", "content": "and?"}]]
    out = template_messages(messages)
    assert [m.get("tool_call_id") for m in out] == [None, None, "call_0", "call_1", "call_2", None]
    assert [m["content"] for m in out[2:5]] == ["0", "2", "4"]
    # a JSON-string argument is parsed, so the call renders the way the model writes it
    assert out[1]["content"] == "" and out[1]["tool_calls"][1]["function"]["arguments"] == {"expression": "1+1"}


@pytest.mark.parametrize("text,want", [
    ("Sure.\n<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"2*3\"}}\n</tool_call>",
     ("Sure.", [{"name": "calculator", "arguments": {"expression": "2*3"}}])),
    ("<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>",
     ("", [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}])),
    ("<tool_call>\nnot json\n</tool_call>", ("", ["not json"])),
    ("cut off <tool_call>\n{\"name\": \"a\", \"argu", ("cut off", ["{\"name\": \"a\", \"argu"])),
    ("no call here, just <tool text", ("no call here, just <tool text", [])),
    ("trailing blank stays\n", ("trailing blank stays\n", [])),
])
def test_tool_call_blocks_are_cut_out_the_same_streamed_or_whole(text, want):
    def run(pieces):
        s = ReplySplitter(tool_calls=True)
        out = [e for p in pieces for e in s.feed(p)] + s.finish()
        return "".join(e[1] for e in out if e[0] == "content"), [e[1] for e in out if e[0] == "tool_call"]
    assert run([text]) == want
    assert run(list(text)) == want


@pytest.mark.parametrize("start,text,want", [
    ("think", "hmm\n</think>\n<answer>\n42\n</answer>", ("hmm", "42", True)),
    ("think", "still thinking", ("still thinking", "", True)),
    ("answer", "<answer>\n42\n</answer>", ("", "42", False)),
    ("answer", "\n plain answer \n", ("", "plain answer", False)),
])
def test_pre_filled_think_block_starts(start, text, want):
    for pieces in ([text], list(text)):
        s = ReplySplitter(start=start)
        out = [d for p in pieces for d in s.feed(p)] + s.finish()
        got = ("".join(t for f, t in out if f == "reasoning_content"), "".join(t for f, t in out if f == "content"), s.reasoning)
        assert got == want
