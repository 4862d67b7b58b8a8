"""
Serve any MiniMind stage behind an OpenAI-compatible chat API (FastAPI + uvicorn), with a chat page at /.

    python scripts/serve_openai_api.py --model_mode 1 --dim 512             # out/full_sft_512.pth
    python scripts/serve_openai_api.py --model_mode 2 --lora_name lora_medical
    python scripts/serve_openai_api.py --model_path out/MiniMind2-Small     # a transformers folder
    python scripts/serve_openai_api.py --model_mode 1 --tools all           # the chat page may use the tools

Then open the printed page address (http://127.0.0.1:8998/) in a browser, or talk to it with any OpenAI client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8998/v1", api_key="none")
    r = client.chat.completions.create(model="minimind", messages=[{"role": "user", "content": "你好"}])

Endpoints: POST /v1/chat/completions (messages, temperature, top_p, max_tokens, stream, seed, tools,
tool_choice "auto"/"none"/"required"/a named function, parallel_tool_calls, response_format text/json_object/
json_schema, enable_thinking, chat_template_kwargs; extensions top_k, repetition_penalty, server_tools), GET /v1/models (with the model's stage and size), GET / (the chat page, scripts/web/).
Every invalid field is a 400 with an OpenAI-style error body; OpenAI options this server does not
implement (stop, logprobs, penalties, logit_bias) are accepted at their "off" values only,
never silently ignored. temperature 0 is greedy. A reply that starts with <think> (the reasoning model) puts the thinking in
`reasoning_content` and the rest, with the <answer> tags removed, in `content`; enable_thinking true
pre-fills <think> (the reply starts inside it), false pre-fills an empty think block. With `tools`, the
model's <tool_call> blocks come back as `tool_calls` (finish_reason "tool_calls"), never as text, and the
client runs them and sends the results as role "tool" messages, as OpenAI's API does. The blocks are decoded
guided (trainer/tool_guide.py: always a well-formed call to one of the request's tools; --guided_tool_calls 0
turns it off), which also makes tool_choice "required" and a named function possible, and parallel_tool_calls
false (at most one call). The same automaton makes response_format json_object / json_schema work: the whole
reply is then one JSON value the schema allows. Prompts longer than
max_seq_len - max_tokens keep the system message and the most recent messages that fit. There is no
authentication: keep the default --host 127.0.0.1 unless the network in front of it is trusted.

The page's mode (`"server_tools": true`, an extension the chat page sends): the server renders the tools it
was started with (--tools) and runs the model's calls itself, through the same loop as eval_model.py
--tools (trainer/chat.py), so a browser needs no tool code. The stream then carries every message of the
turn: tool calls as usual, each result as a delta with role "tool" (tool_call_id, name, content), and a
delta with role "assistant" opening the next reply; a non-streamed reply lists them in choices[0].messages.
Requests without it keep OpenAI's semantics: the server never runs a tool for an API client.

Concurrency: every request runs its own generation (own KV cache, own random generator) in a worker
thread; one lock serialises the model steps, so concurrent requests advance token by token in turn and
never share state. A client that disconnects (the page's Stop button) ends its generation.
"""
import argparse
import json
import os
import random
import re
import sys
import threading
import time
import uuid
from typing import Annotated, Any, Literal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, field_validator  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from dataset.lm_dataset import load_tokenizer, render_chat  # noqa: E402
from model.model_minimind import count_parameters, stream_text  # noqa: E402
from scripts.convert_model import add_model_args, load_native, load_transformers_dir  # noqa: E402
from trainer.chat import add_tool_args, chat_turn, is_well_formed_call, openai_tool_call, tools_from_args  # noqa: E402
from trainer.tool_guide import JsonReplyGuide, ToolCallGuide, can_guide  # noqa: E402
from trainer.tools import parse_tool_calls  # noqa: E402
from trainer_utils import (ArgumentParser, UserError, add_bool, device_name, float_in, int_in, port_int,  # noqa: E402
                           positive_int, run_main)


# ----------------------------------------------------------------------------------------------------
# Request schema. Every field has its type and range here, so a bad value is a 400 before any work.
# Numbers are strict ("0.7", a string, is not a temperature) and finite (no NaN / Infinity).
# ----------------------------------------------------------------------------------------------------
def unicode_text(text):
    """JSON can carry a lone surrogate ("\\ud800"); no tokenizer can encode one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text (a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start + 1})") from None
    return text


def finite_float(**bounds):
    return Annotated[float, Field(strict=True, allow_inf_nan=False, **bounds)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str

    _valid_text = field_validator("text")(unicode_text)


class FunctionCall(BaseModel):
    name: Annotated[str, Field(strict=True)]
    arguments: Any  # OpenAI sends a JSON string; an object is taken too (checked in template_messages)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: Annotated[str, Field(strict=True, min_length=1)]
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # may be null (or left out) on an assistant message with tool_calls
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = None  # assistant
    tool_call_id: Annotated[str, Field(strict=True)] | None = None  # tool: the id of the call it answers
    reasoning_content: Annotated[str, Field(strict=True)] | None = None  # assistant: its think part

    @field_validator("content")
    @classmethod
    def _valid_content(cls, v):
        return unicode_text(v) if isinstance(v, str) else v

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionSpec(BaseModel):
    name: Annotated[str, Field(strict=True, pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Annotated[str, Field(strict=True)] | None = None
    parameters: dict | None = None
    strict: Annotated[bool, Field(strict=True)] | None = None


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class ChatTemplateKwargs(BaseModel):
    model_config = ConfigDict(extra="forbid")  # the template reads only these
    enable_thinking: Annotated[bool, Field(strict=True)] | None = None
    open_thinking: Annotated[bool, Field(strict=True)] | None = None  # MiniMind-3's name for it


class StreamOptions(BaseModel):
    include_usage: Annotated[bool, Field(strict=True)] = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    temperature: finite_float(ge=0, le=2) | None = None
    top_p: finite_float(gt=0, le=1) | None = None
    max_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    stream: Annotated[bool, Field(strict=True)] = False
    stream_options: StreamOptions | None = None
    seed: Annotated[int, Field(strict=True, ge=-2**63, le=2**64 - 1)] | None = None  # what a torch generator takes
    n: Annotated[int, Field(strict=True, ge=1, le=1)] = 1
    top_k: Annotated[int, Field(strict=True, ge=0)] | None = None  # extension
    repetition_penalty: finite_float(gt=0) | None = None  # extension
    user: str | None = None  # accepted and unused, as OpenAI's own servers use it only for abuse tracking
    # OpenAI options not implemented here: typed, so a malformed value is a 400, and refused unless "off"
    stop: str | list[str] | None = None
    logprobs: Annotated[bool, Field(strict=True)] | None = None
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = None
    presence_penalty: finite_float(ge=-2, le=2) | None = None
    frequency_penalty: finite_float(ge=-2, le=2) | None = None
    logit_bias: dict[str, finite_float(ge=-100, le=100)] | None = None
    response_format: dict | None = None  # text, json_object or json_schema: Engine.reply_schema
    tools: list[ToolSpec] | None = None
    parallel_tool_calls: Annotated[bool, Field(strict=True)] | None = None  # false: at most one call
    tool_choice: Any = None  # "auto", "none", "required" or {"type": "function", "function": {"name"}}: Engine.tool_choice
    enable_thinking: Annotated[bool, Field(strict=True)] | None = None  # vLLM / Qwen3 spelling, also in chat_template_kwargs
    chat_template_kwargs: ChatTemplateKwargs | None = None
    server_tools: Annotated[bool, Field(strict=True)] = False  # extension: the chat page's mode (module docstring)


NOT_IMPLEMENTED = {  # field -> (is it off?, what to say)
    "stop": (lambda v: not v, "stop sequences are not supported by this server; leave stop out"),
    "logprobs": (lambda v: not v, "logprobs are not supported by this server"),
    "top_logprobs": (lambda v: not v, "logprobs are not supported by this server"),
    "presence_penalty": (lambda v: not v, "presence_penalty is not supported; use repetition_penalty (> 1 discourages repeats)"),
    "frequency_penalty": (lambda v: not v, "frequency_penalty is not supported; use repetition_penalty (> 1 discourages repeats)"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported by this server"),
}


class BadRequest(Exception):
    def __init__(self, message, param=None, code=None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def error_body(message, type_="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _is_union_branch(part):  # pydantic names the member of a union that failed: "str", "list[TextPart]"
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list", "none") or "[" in part)


def validation_message(errors):
    """(param, message, type) for pydantic's errors: the deepest field that failed (for a union, the member the
    value was meant to be), named like OpenAI does ("messages.0.content")."""
    if not errors:
        return None, "invalid request", ""
    def param_of(err):
        return ".".join(str(x) for x in err.get("loc", ()) if x != "body" and not _is_union_branch(x)) or None
    # deepest by path length; among equals the first, as pydantic checks fields in order ("type" before "function")
    deepest = max(errors, key=lambda e: len((param_of(e) or "").split(".")) if param_of(e) else 0)
    param, kind = param_of(deepest), deepest.get("type", "")
    if kind == "json_invalid":  # its loc is a character offset
        return None, f"request body is not valid JSON ({deepest.get('ctx', {}).get('error', deepest['msg'])})", kind
    if not param and kind in ("model_attributes_type", "dict_type"):
        return None, "request body must be a JSON object (sent with Content-Type: application/json)", kind
    msgs = list(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errors if param_of(e) == param))
    return param, f"{param or 'request body'}: {' or '.join(msgs)}", kind


# ----------------------------------------------------------------------------------------------------
# Reasoning replies: <think> ... </think> <answer> ... </answer>, split while streaming
# ----------------------------------------------------------------------------------------------------
def _partial_tag_suffix(text, tags):
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags` (held back while streaming)."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


class ReplySplitter:
    """Turns a reply's text pieces into events: (field, text) with field "reasoning_content" or "content",
    and, when `tool_calls` is on, ("tool_call", call, block) for each <tool_call> block (call as
    trainer.tools.parse_tool_calls reads it: a dict, or the raw text of a block that is not a JSON object).

    `start` is where the reply begins: "start" (a reply whose first non-blank text is <think> is a
    reasoning reply), "think" (the prompt pre-filled <think>: enable_thinking true) or "answer" (the prompt
    pre-filled an empty think block: enable_thinking false). In a reasoning reply, what comes before
    </think> is reasoning_content, the rest is content with the <answer>/</answer> tags removed, and each
    part is trimmed of surrounding whitespace; the answer after a pre-filled empty think block is treated
    the same way. Any other reply is content, verbatim, except for the blank text around tool-call blocks.
    Streaming and non-streaming replies go through this same class, so the concatenated deltas equal the
    full message."""
    THINK, END_THINK, ANSWER_TAGS = "<think>", "</think>", ("<answer>", "</answer>")
    CALL, END_CALL = "<tool_call>", "</tool_call>"

    def __init__(self, start="start", tool_calls=False):
        self.state = start  # start -> plain | think -> answer
        self.reasoning = start == "think"
        self.tool_calls = tool_calls
        self.in_call = False  # inside a <tool_call> block: held until it closes
        self.buf = ""
        self.pending_ws = ""
        self.at_section_start = True

    def feed(self, text):
        self.buf += text
        return self._drain(final=False)

    def finish(self):
        return self._drain(final=True)

    def _section(self):
        self.pending_ws, self.at_section_start = "", True

    def _emit(self, out, field, text):
        """Trimmed output: leading blanks of a section dropped, trailing blanks held until more text comes."""
        if self.at_section_start:
            text = text.lstrip()
            if not text:
                return
            self.at_section_start = False
        body = text.rstrip()
        if body:
            out.append((field, self.pending_ws + body))
            self.pending_ws = text[len(body):]
        else:
            self.pending_ws += text

    def _emit_plain(self, out, text):
        """Verbatim content; with tool calls on, the blank text next to a block is dropped."""
        if self.tool_calls:
            self._emit(out, "content", text)  # trims only after a block: a plain reply starts mid-section
        elif text:
            out.append(("content", text))

    def _emit_content(self, out, text):
        if self.state == "answer":
            for tag in self.ANSWER_TAGS:
                text = text.replace(tag, "")
            self._emit(out, "content", text)
        else:
            self._emit_plain(out, text)

    def _drain(self, final):
        out = []
        while True:
            if self.state == "start":
                head = self.buf.lstrip()
                if head.startswith(self.THINK):
                    self.buf, self.state, self.reasoning = head[len(self.THINK):], "think", True
                    self._section()
                    continue
                if not final and self.THINK.startswith(head):  # may still become <think>
                    return out
                self.state, self.at_section_start = "plain", False
            elif self.state == "think":
                i = self.buf.find(self.END_THINK)
                if i >= 0:
                    self._emit(out, "reasoning_content", self.buf[:i])
                    self.buf, self.state = self.buf[i + len(self.END_THINK):], "answer"
                    self._section()
                    continue
                keep = 0 if final else _partial_tag_suffix(self.buf, (self.END_THINK,))
                self._emit(out, "reasoning_content", self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                return out
            elif self.in_call:
                i = self.buf.find(self.END_CALL)
                if i < 0 and not final:
                    return out
                end = len(self.buf) if i < 0 else i + len(self.END_CALL)  # an unclosed block at the end counts too
                block, self.buf, self.in_call = self.CALL + self.buf[:end], self.buf[end:], False
                out.append(("tool_call", parse_tool_calls(block)[1][0], block))
                self._section()  # the blank after a block is dropped
            else:  # plain or answer: content, with <tool_call> blocks cut out
                i = self.buf.find(self.CALL) if self.tool_calls else -1
                if i >= 0:
                    self._emit_content(out, self.buf[:i])
                    self.pending_ws = ""  # the newline the template puts before a block
                    self.buf, self.in_call = self.buf[i + len(self.CALL):], True
                    continue
                tags = (self.ANSWER_TAGS if self.state == "answer" else ()) + ((self.CALL,) if self.tool_calls else ())
                keep = 0 if final else _partial_tag_suffix(self.buf, tags)
                self._emit_content(out, self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                if final and self.state == "plain" and self.pending_ws:
                    out.append(("content", self.pending_ws))  # a plain reply keeps its trailing blank
                    self.pending_ws = ""
                return out


# ----------------------------------------------------------------------------------------------------
# The model side: prompt building and generation
# ----------------------------------------------------------------------------------------------------
def history_arguments(arguments):
    """A past call's arguments for the template: a JSON string is parsed, so the call renders the way the
    model writes (and was trained on) it whatever spacing the client used; a string that is not JSON stays
    as it is."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def template_messages(messages):
    """The request's messages as the chat template takes them. Checks what pydantic cannot: content where a
    role needs it, fields on the right roles, and tool messages that answer, one each, the calls of the
    assistant message before them (put in the calls' order: the template pairs results with calls by
    position). BadRequest names the message and field."""
    out, open_calls, answered = [], None, None  # open_calls: call ids of the last assistant message -> position

    def close_run(i):
        missing = [cid for cid in open_calls if cid not in answered]
        if missing:
            raise BadRequest(f"messages.{i}: the assistant message's tool call {missing[0]!r} has no answer: follow an "
                             f"assistant message with tool_calls by one tool message per call (with its tool_call_id)",
                             f"messages.{i}")
        run = [out.pop() for _ in range(len(answered))][::-1]
        out.extend(sorted(run, key=lambda m: open_calls[m["tool_call_id"]]))

    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if m.role != "tool" and open_calls is not None:
            close_run(i)
            open_calls = None
        for field in ("tool_calls", "reasoning_content"):
            if getattr(m, field) is not None and m.role != "assistant":
                raise BadRequest(f"{where}.{field}: only an assistant message carries {field}", f"{where}.{field}")
        if m.tool_call_id is not None and m.role != "tool":
            raise BadRequest(f"{where}.tool_call_id: only a tool message carries tool_call_id", f"{where}.tool_call_id")
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            article = "an" if m.role == "assistant" else "a"
            raise BadRequest(f"{where}.content: {article} {m.role} message needs content"
                             f"{' (or tool_calls)' if m.role == 'assistant' else ''}", f"{where}.content")
        msg = {"role": m.role, "content": m.text()}
        if m.role == "assistant":
            if m.reasoning_content is not None:
                msg["reasoning_content"] = m.reasoning_content
            if m.tool_calls:
                ids = [c.id for c in m.tool_calls]
                for k, c in enumerate(m.tool_calls):
                    if not isinstance(c.function.arguments, (str, dict)):
                        param = f"{where}.tool_calls.{k}.function.arguments"
                        raise BadRequest(f"{param}: the arguments must be a JSON string (or an object)", param)
                if len(set(ids)) < len(ids):
                    raise BadRequest(f"{where}.tool_calls: two calls share the id {ids[0]!r}", f"{where}.tool_calls")
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": history_arguments(c.function.arguments)}} for c in m.tool_calls]
                open_calls, answered = {cid: k for k, cid in enumerate(ids)}, set()
        elif m.role == "tool":
            if m.tool_call_id is None:
                raise BadRequest(f"{where}.tool_call_id: a tool message needs the id of the call it answers", f"{where}.tool_call_id")
            if open_calls is None:
                raise BadRequest(f"{where}: a tool message must follow an assistant message with tool_calls", where)
            if m.tool_call_id not in open_calls or m.tool_call_id in answered:
                what = "is answered twice" if m.tool_call_id in answered else "is not a call of the assistant message before it"
                raise BadRequest(f"{where}.tool_call_id: {m.tool_call_id!r} {what}", f"{where}.tool_call_id")
            answered.add(m.tool_call_id)
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    if open_calls is not None:
        close_run(len(messages))
    return out


def request_thinking(req):
    """enable_thinking from the request (top level or chat_template_kwargs; open_thinking is an alias): True, False or None."""
    kw = req.chat_template_kwargs or ChatTemplateKwargs()
    given = {name: value for name, value in [("enable_thinking", req.enable_thinking),
                                              ("chat_template_kwargs.enable_thinking", kw.enable_thinking),
                                              ("chat_template_kwargs.open_thinking", kw.open_thinking)] if value is not None}
    if len(set(given.values())) > 1:
        raise BadRequest(f"{' and '.join(given)} disagree; give one of them", next(iter(given)))
    return next(iter(given.values()), None)


class Engine:
    def __init__(self, model, tokenizer, name, device, max_seq_len, max_tokens, temperature, top_p, raw_prompt=False,
                 tools=None, max_tool_rounds=4, info=None, guided_tool_calls=True):
        self.model, self.tokenizer, self.name, self.device = model, tokenizer, name, device
        self.max_seq_len, self.default_max_tokens = max_seq_len, max_tokens
        self.temperature, self.top_p = temperature, top_p
        self.raw_prompt = raw_prompt  # a pretrain model continues text; it never saw the chat template
        self.tools, self.max_tool_rounds = tools or {}, max_tool_rounds  # --tools: run for server_tools requests
        self.info = info or {}  # what /v1/models says about the model (stage, size, ...)
        # --guided_tool_calls: tool_guide.py keeps every <tool_call> block a well-formed call to the request's tools
        self.guided = bool(guided_tool_calls) and can_guide(tokenizer)
        self.lock = threading.Lock()  # one model step at a time (see the module docstring)

    def _encode(self, messages, tools, template_kwargs):
        text = render_chat(self.tokenizer, messages, tools, add_generation_prompt=True, **template_kwargs)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, msgs, max_tokens, tools=None, template_kwargs=None):
        """Token ids of the prompt within max_seq_len - max_tokens: the leading system message(s) and the
        most recent messages that fit, starting at a user message. BadRequest if even the last user
        message alone does not fit."""
        budget, template_kwargs = self.max_seq_len - max_tokens, template_kwargs or {}
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if not users:
            raise BadRequest("messages must contain at least one message with role 'user'", "messages")
        if self.raw_prompt:
            ids = self.tokenizer(self.tokenizer.bos_token + msgs[users[-1]]["content"], add_special_tokens=False)["input_ids"]
            if len(ids) > budget:
                raise self._too_long(len(ids), budget)
            return ids
        n_sys = 0
        while msgs[n_sys]["role"] == "system":
            n_sys += 1
        starts = users  # a kept history starts at a user message (all of them come after the system block)
        # Fewer messages never make a longer prompt: binary search for the earliest start that fits.
        lo, hi, best = 0, len(starts) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            ids = self._encode(msgs[:n_sys] + msgs[starts[mid]:], tools, template_kwargs)
            if len(ids) <= budget:
                best, hi = ids, mid - 1
            else:
                lo = mid + 1
        if best is not None:
            return best
        ids = self._encode(msgs[starts[-1]:], tools, template_kwargs)  # drop the system prompt as a last resort
        if len(ids) <= budget:
            return ids
        raise self._too_long(len(ids), budget)

    def _too_long(self, n, budget):
        return BadRequest(f"the last user message needs {n} prompt tokens but only {budget} fit "
                          f"(max_seq_len {self.max_seq_len} - max_tokens {self.max_seq_len - budget}); "
                          f"shorten it or lower max_tokens", "messages", "context_length_exceeded")

    def need_guide(self, field, what):
        if not self.guided:
            raise BadRequest(f"{field}: {what} needs guided decoding, which this server has off "
                             f"(--guided_tool_calls 0, or a tokenizer without <tool_call> tokens)", field)

    def tool_choice(self, req: ChatRequest):
        """req.tool_choice checked -> (the tool names a call may use (None: any offered), whether a call is required)."""
        choice = req.tool_choice
        if choice is None or choice in ("auto", "none"):
            return None, False
        named = isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str)
        if choice != "required" and not named:
            raise BadRequest(f"tool_choice {json.dumps(choice)} is not supported: this server takes \"auto\" (the model "
                             f"decides), \"none\" (no tools), \"required\" (at least one call) or "
                             f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}} (a call to that function)", "tool_choice")
        if req.server_tools:
            raise BadRequest("tool_choice: with server_tools only \"auto\" and \"none\" (the page's tools are the model's choice)",
                             "tool_choice")
        self.need_guide("tool_choice", "forcing a call")
        if not named:
            return None, True
        name, offered = choice["function"]["name"], [t.function.name for t in req.tools]
        if name not in offered:
            raise BadRequest(f"tool_choice names {name!r}, which is not in tools ({', '.join(offered)})", "tool_choice")
        return [name], True

    def reply_schema(self, req: ChatRequest, tools, thinking):
        """response_format checked -> the JSON schema the reply must follow ({}: any JSON value), or None for text."""
        fmt = req.response_format
        if not fmt or fmt == {"type": "text"}:
            return None
        kind = fmt.get("type")
        spec = fmt.get("json_schema")
        if kind == "json_object" and set(fmt) == {"type"}:
            schema = {"type": "object"}
        elif kind == "json_schema" and set(fmt) == {"type", "json_schema"} and isinstance(spec, dict) \
                and isinstance(spec.get("name"), str) and isinstance(spec.get("schema", {}), dict):
            schema = spec.get("schema", {})  # {}: any JSON value
        else:
            raise BadRequest("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                             "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}", "response_format")
        self.need_guide("response_format", "a JSON reply")
        if tools or req.server_tools:
            raise BadRequest("response_format: a JSON reply cannot also call tools; leave out tools or response_format",
                             "response_format")
        if thinking:
            raise BadRequest("response_format: the JSON is the whole reply, so it cannot start inside a think block; "
                             "leave out enable_thinking or set it false", "response_format")
        return schema

    def request_tools(self, req: ChatRequest):
        """The tool schemas to render into the prompt (None: no tools), and whether the server runs them."""
        if req.tool_choice is not None and not req.tools and not req.server_tools:
            raise BadRequest("tool_choice is only allowed when tools are given", "tool_choice")
        if req.server_tools:
            if not self.tools:
                raise BadRequest("server_tools: this server runs no tools; start it with --tools calculator,units,dates "
                                 "(or all)", "server_tools")
            if req.tools:
                raise BadRequest("tools: leave it out with server_tools (the server uses the tools it was started with)", "tools")
        if req.tool_choice == "none" or not (req.tools or req.server_tools):
            return None, False
        if req.server_tools:
            return [t.schema for t in self.tools.values()], True
        return [t.model_dump(exclude_none=True) for t in req.tools], False

    def prepare(self, req: ChatRequest):
        """Validate a request against this server. Returns the generation settings."""
        for field, (is_off, message) in NOT_IMPLEMENTED.items():
            if not is_off(getattr(req, field)):
                raise BadRequest(message, field, "unsupported_parameter")
        which = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, self.max_seq_len // 2)
        elif max_tokens >= self.max_seq_len:
            raise BadRequest(f"{which} {max_tokens} must be less than the server's max_seq_len {self.max_seq_len}", which)
        messages = template_messages(req.messages)
        tools, run_tools = self.request_tools(req)
        call_names, call_required = self.tool_choice(req)
        if req.parallel_tool_calls is False and tools:
            self.need_guide("parallel_tool_calls", "false")
        thinking = request_thinking(req)
        reply_schema = self.reply_schema(req, tools, thinking)
        if self.raw_prompt:
            for field, used in [("tools", tools), ("server_tools", run_tools), ("enable_thinking", thinking is not None)]:
                if used:
                    raise BadRequest(f"{field}: this server continues plain text (a pretrain model, --raw_prompt); "
                                     f"serve a chat model for tools and thinking", field)
        template_kwargs = {} if thinking is None else {"enable_thinking": thinking}
        ids = self.prompt_ids(messages, max_tokens, tools, template_kwargs)
        seed = req.seed if req.seed is not None else random.getrandbits(63)
        return dict(ids=ids, messages=messages, tools=tools, run_tools=run_tools, thinking=thinking,
                    call_names=call_names, call_required=call_required, single_call=req.parallel_tool_calls is False,
                    reply_schema=reply_schema,
                    template_kwargs=template_kwargs, max_tokens=max_tokens, seed=seed,
                    temperature=self.temperature if req.temperature is None else req.temperature,
                    top_p=self.top_p if req.top_p is None else req.top_p,
                    top_k=req.top_k or 0, repetition_penalty=req.repetition_penalty or 1.0)

    def token_ids(self, job, ids, stats):
        """Yield new token ids for one reply. The KV cache and the random generator (one per request) belong
        to this request alone; only the model steps themselves take the shared lock."""
        if "generator" not in job:
            job["generator"] = torch.Generator(device=self.device).manual_seed(job["seed"])
        stats["prompt_tokens"] += len(ids)
        guide = None
        if job["reply_schema"] is not None:
            guide = JsonReplyGuide(self.tokenizer, job["reply_schema"], len(ids))
        elif job["tools"] and self.guided:
            guide = ToolCallGuide(self.tokenizer, job["tools"], len(ids), names=job["call_names"], required=job["call_required"],
                                  max_calls=1 if job["single_call"] else None)
        steps = self.model.stream_generate(
            torch.tensor([ids], device=self.device), max_new_tokens=job["max_tokens"], temperature=job["temperature"],
            top_p=job["top_p"], top_k=job["top_k"], repetition_penalty=job["repetition_penalty"],
            eos_token_id=self.tokenizer.eos_token_id, generator=job["generator"], logits_processor=guide)
        n = 0
        try:
            while True:
                with self.lock:
                    try:
                        tid = next(steps)
                    except StopIteration:
                        break
                n += 1
                stats["completion_tokens"] += 1
                yield tid
        finally:
            steps.close()
        stats["finish_reason"] = "length" if n >= job["max_tokens"] else "stop"

    def _splitter(self, job):
        start = {True: "think", False: "answer", None: "start"}[job["thinking"]]
        return ReplySplitter(start, tool_calls=job["tools"] is not None)

    def _text(self, job, ids, stats):
        return stream_text(self.tokenizer, self.token_ids(job, ids, stats))

    def events(self, job, stats):
        """The reply as events: ("role", "assistant") opens an assistant message, then its (field, text)
        deltas ("reasoning_content" / "content"), ("tool_call", OpenAI tool call) and ("reply_end", whether
        it was a reasoning reply); in the page's mode also ("tool", tool message) between the replies."""
        stats.update(prompt_tokens=0, completion_tokens=0, finish_reason="stop")
        if job["run_tools"]:
            yield from self._page_events(job, stats)
            return
        # OpenAI's semantics: a well-formed <tool_call> block becomes a tool call that the client runs
        yield "role", "assistant"
        splitter, n_calls = self._splitter(job), 0

        def client_events(out):
            nonlocal n_calls
            for event in out:
                if event[0] != "tool_call":
                    yield event
                elif is_well_formed_call(event[1]):
                    n_calls += 1
                    yield "tool_call", openai_tool_call(event[1])
                else:  # not a call a client could run: the text as the model wrote it
                    yield "content", event[2]

        for piece in self._text(job, job["ids"], stats):
            yield from client_events(splitter.feed(piece))
        yield from client_events(splitter.finish())
        yield "reply_end", splitter.reasoning
        if n_calls:
            stats["finish_reason"] = "tool_calls"

    def _page_events(self, job, stats):
        """The web page's mode (server_tools): the server runs the calls with its --tools through the same
        loop as eval_model.py --tools, and streams every message of the turn."""
        prompts = iter([job["ids"]])  # the first prompt was built (and checked) by prepare

        def generate(messages):
            ids = next(prompts, None) or self.prompt_ids(messages, job["max_tokens"], job["tools"], job["template_kwargs"])
            return self._text(job, ids, stats)

        splitter = None
        for event, value in chat_turn(generate, job["messages"], self.tools, job["thinking"], self.max_tool_rounds):
            if event == "reply_start":
                splitter = self._splitter(job)
                yield "role", "assistant"
            elif event in ("text", "reply"):  # blocks are hidden from the text; they come whole with the reply
                yield from (e for e in (splitter.feed(value) if event == "text" else splitter.finish()) if e[0] != "tool_call")
                if event == "reply":
                    for call in value.get("tool_calls", []):
                        yield "tool_call", call
                    yield "reply_end", splitter.reasoning
            elif event == "tool_result":
                yield "tool", value
            elif event == "round_limit":
                stats["finish_reason"] = "tool_calls"

    def usage(self, stats):
        p, c = stats["prompt_tokens"], stats["completion_tokens"]
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# ----------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------
WEB_DIR = os.path.join(ROOT, "scripts", "web")


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="MiniMind OpenAI-compatible API")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):  # FastAPI's default is a 422 in its own format
        param, message, _ = validation_message(exc.errors())
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(BadRequest)
    async def _bad_request(request, exc: BadRequest):
        return JSONResponse(error_body(exc.message, param=exc.param, code=exc.code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request, exc):  # a bug, not the client's fault: still an OpenAI-style body
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), status_code=500)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": engine.created,
                                            "owned_by": "minimind", **engine.info}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        job = engine.prepare(req)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse_events(engine, job, rid, created, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run_in_threadpool(complete, engine, job, rid, created)

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(os.path.join(WEB_DIR, "index.html"), headers={"Cache-Control": "no-cache"})

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    engine.created = int(time.time())
    return app


def complete(engine, job, rid, created):
    """A non-streamed reply: the events gathered into messages. In the page's mode every message of the
    turn is also listed in choices[0].messages (extension); `message` is the last one."""
    stats, messages = {}, []
    for event in engine.events(job, stats):
        kind = event[0]
        if kind == "role":
            messages.append({"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": []})
        elif kind in ("content", "reasoning_content"):
            messages[-1][kind] += event[1]
        elif kind == "tool_call":
            messages[-1]["tool_calls"].append(event[1])
        elif kind == "reply_end":
            m = messages[-1]
            if not event[1]:
                del m["reasoning_content"]
            if not m["tool_calls"]:
                del m["tool_calls"]
            elif not m["content"]:
                m["content"] = None  # as OpenAI returns a reply that only calls tools
        elif kind == "tool":
            messages.append(event[1])
    choice = {"index": 0, "message": messages[-1], "logprobs": None, "finish_reason": stats["finish_reason"]}
    if job["run_tools"]:
        choice["messages"] = messages
    return {"id": rid, "object": "chat.completion", "created": created, "model": engine.name,
            "choices": [choice], "usage": engine.usage(stats)}


def sse_events(engine, job, rid, created, include_usage):
    """A sync generator: Starlette runs each step in a worker thread, so the event loop stays free.
    Tool calls go out as OpenAI does: per call, a first chunk with its index, id, type and name, then its
    arguments. In the page's mode a tool result is a chunk whose delta has role "tool", and a delta with
    role "assistant" opens the next reply (extension)."""
    def chunk(delta, finish_reason=None):
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    stats, index = {}, 0
    try:
        for event in engine.events(job, stats):
            kind = event[0]
            if kind == "role":
                index = 0
                yield chunk({"role": event[1]})
            elif kind in ("content", "reasoning_content"):
                yield chunk({kind: event[1]})
            elif kind == "tool_call":
                call = event[1]
                yield chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                             "function": {"name": call["function"]["name"], "arguments": ""}}]})
                yield chunk({"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]})
                index += 1
            elif kind == "tool":
                yield chunk(event[1])
    except Exception as e:  # noqa: BLE001 - the status line is already sent; report in-stream
        body = (error_body(e.message, param=e.param, code=e.code) if isinstance(e, BadRequest)
                else error_body(f"generation failed: {type(e).__name__}: {e}", "server_error"))
        yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
        return
    yield chunk({}, stats["finish_reason"])
    if include_usage:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                "choices": [], "usage": engine.usage(stats)}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, weight_help="a native .pth to serve, or a stage prefix in --out_dir (grpo, ppo, reason, ...) "
                                  "(default: picked by --model_mode/--out_dir/--dim/--use_moe)")
    p.add_argument("--model_path", default=None, help="serve a transformers folder (Llama or MiniMind, e.g. from convert_model.py) instead")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface; there is no authentication)")
    g.add_argument("--port", type=port_int, default=8998)
    g.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--max_seq_len", type=int_in(2), default=8192, help="prompt + reply token budget per request")
    g.add_argument("--max_tokens", type=positive_int, default=512, help="reply length when a request does not say")
    g.add_argument("--temperature", type=float_in(0, 2), default=0.85, help="default when a request does not say")
    g.add_argument("--top_p", type=float_in(0, 1, lo_open=True), default=0.85, help="default when a request does not say")
    g.add_argument("--served_model_name", default=None, help="model id reported by /v1/models and in replies")
    add_bool(g, "--raw_prompt", default=None, help="continue the last user message as plain text, no chat template "
                                                   "(default: on for a pretrain checkpoint)")
    add_tool_args(p, "the server runs for requests with server_tools: true (the chat page sends it; API clients run their own)")
    return p


def describe_model(model, name, raw_prompt, tools, max_seq_len):
    """What /v1/models says beside the id (the chat page shows it): stage, size, tools."""
    config = model.config
    m = re.match(r"^([a-z_]+?)_(\d+)(_moe)?(?:_(.+))?$", name)  # {stage}_{dim}[_moe][_{lora}] as load_native names it
    return {"stage": m.group(1) if m else None, "lora": m.group(4) if m else None,
            "parameters": count_parameters(model), "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers, "use_moe": bool(getattr(config, "use_moe", False)),
            "max_seq_len": max_seq_len, "raw_prompt": raw_prompt, "tools": list(tools)}


def load_engine(args):
    if args.model_path:
        if args.weight or args.lora_path or (args.lora_name and args.lora_name != "None"):
            raise UserError("--model_path serves a transformers folder as it is; drop --weight/--lora_name/--lora_path "
                            "(merge an adapter in first with scripts/convert_model.py --lora_name)")
        model = load_transformers_dir(args.model_path)
        name = os.path.basename(os.path.normpath(args.model_path))
        tok_dir = args.model_path if os.path.exists(os.path.join(args.model_path, "tokenizer.json")) else args.tokenizer_path
    else:
        model, name = load_native(args)
        tok_dir = args.tokenizer_path
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        raise UserError(f"{tok_dir}/tokenizer.json not found: run train_tokenizer.py or point --tokenizer_path at the tokenizer folder")
    tokenizer = load_tokenizer(tok_dir)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} but CUDA is not available; use --device cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if args.device.startswith("cuda") else "float32")
    model = model.to(args.device, getattr(torch, dtype)).eval()
    raw = args.raw_prompt if args.raw_prompt is not None else name.startswith("pretrain")
    tools = tools_from_args(args)
    if tools and raw:
        raise UserError("--tools needs a chat model: this one continues plain text (a pretrain checkpoint or --raw_prompt 1)")
    return Engine(model, tokenizer, args.served_model_name or f"minimind-{name}", torch.device(args.device),
                  args.max_seq_len, args.max_tokens, args.temperature, args.top_p, raw_prompt=raw,
                  tools=tools, max_tool_rounds=args.max_tool_rounds, guided_tool_calls=args.guided_tool_calls,
                  info=describe_model(model, name, raw, tools, args.max_seq_len))


def main(argv=None):
    import uvicorn
    args = build_parser().parse_args(argv)
    engine = load_engine(args)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host  # an address a browser here can open
    print(f"serving {engine.name} on http://{host}:{args.port}/v1 (device {args.device}, max_seq_len {args.max_seq_len}"
          f"{', tools ' + ','.join(engine.tools) if engine.tools else ''})", flush=True)
    print(f"chat page: http://{host}:{args.port}/", flush=True)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    run_main(main)
