"""
Serve any MiniMind stage behind an OpenAI-compatible chat API (FastAPI + uvicorn).

    python scripts/serve_openai_api.py --model_mode 1 --dim 512             # out/full_sft_512.pth
    python scripts/serve_openai_api.py --model_mode 2 --lora_name lora_medical
    python scripts/serve_openai_api.py --model_path out/MiniMind2-Small     # a transformers folder

Then any OpenAI client talks to it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8998/v1", api_key="none")
    r = client.chat.completions.create(model="minimind", messages=[{"role": "user", "content": "你好"}])

Endpoints: POST /v1/chat/completions (messages, temperature, top_p, max_tokens, stream, seed; extensions
top_k, repetition_penalty), GET /v1/models. Every invalid field is a 400 with an OpenAI-style error body;
OpenAI options this server does not implement (stop, logprobs, penalties, logit_bias, response_format) are
accepted at their "off" values only, never silently ignored. temperature 0 is greedy. A reply that starts with <think>
(the reasoning model) puts the thinking in `reasoning_content` and the rest, with the <answer> tags
removed, in `content`. Prompts longer than max_seq_len - max_tokens keep the system message and the most
recent messages that fit. There is no authentication: keep the default --host 127.0.0.1 unless the
network in front of it is trusted.

Concurrency: every request runs its own generation (own KV cache, own random generator) in a worker
thread; one lock serialises the model steps, so concurrent requests advance token by token in turn and
never share state.
"""
import argparse
import json
import os
import random
import sys
import threading
import time
import uuid
from typing import Annotated, Literal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, field_validator  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from dataset.lm_dataset import load_tokenizer  # noqa: E402
from model.model_minimind import stream_text  # noqa: E402
from scripts.convert_model import add_model_args, load_native, load_transformers_dir  # noqa: E402
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _valid_content(cls, v):
        return unicode_text(v) if isinstance(v, str) else v

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


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
    response_format: dict | None = None


NOT_IMPLEMENTED = {  # field -> (is it off?, what to say)
    "stop": (lambda v: not v, "stop sequences are not supported by this server; leave stop out"),
    "logprobs": (lambda v: not v, "logprobs are not supported by this server"),
    "top_logprobs": (lambda v: not v, "logprobs are not supported by this server"),
    "presence_penalty": (lambda v: not v, "presence_penalty is not supported; use repetition_penalty (> 1 discourages repeats)"),
    "frequency_penalty": (lambda v: not v, "frequency_penalty is not supported; use repetition_penalty (> 1 discourages repeats)"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported by this server"),
    "response_format": (lambda v: not v or v == {"type": "text"}, "only response_format {\"type\": \"text\"} is supported"),
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
    deepest = max(errors, key=lambda e: len(param_of(e) or ""))
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
    """Turns a reply's text pieces into (field, text) deltas, field "reasoning_content" or "content".

    A reply whose first non-blank text is <think> is a reasoning reply: what comes before </think> is
    reasoning_content, the rest is content with the <answer>/</answer> tags removed, and each part is
    trimmed of surrounding whitespace. Any other reply is content, verbatim. Streaming and non-streaming
    replies go through this same class, so the concatenated deltas equal the full message."""
    THINK, END_THINK, ANSWER_TAGS = "<think>", "</think>", ("<answer>", "</answer>")

    def __init__(self):
        self.state = "start"  # start -> plain | think -> answer
        self.buf = ""
        self.pending_ws = ""
        self.at_section_start = True
        self.reasoning = False

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
                self.state = "plain"
            elif self.state == "plain":
                if self.buf:
                    out.append(("content", self.buf))
                    self.buf = ""
                return out
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
            else:  # answer
                keep = 0 if final else _partial_tag_suffix(self.buf, self.ANSWER_TAGS)
                text = self.buf[:len(self.buf) - keep]
                for tag in self.ANSWER_TAGS:
                    text = text.replace(tag, "")
                self._emit(out, "content", text)
                self.buf = self.buf[len(self.buf) - keep:]
                return out


# ----------------------------------------------------------------------------------------------------
# The model side: prompt building and generation
# ----------------------------------------------------------------------------------------------------
class Engine:
    def __init__(self, model, tokenizer, name, device, max_seq_len, max_tokens, temperature, top_p, raw_prompt=False):
        self.model, self.tokenizer, self.name, self.device = model, tokenizer, name, device
        self.max_seq_len, self.default_max_tokens = max_seq_len, max_tokens
        self.temperature, self.top_p = temperature, top_p
        self.raw_prompt = raw_prompt  # a pretrain model continues text; it never saw the chat template
        self.lock = threading.Lock()  # one model step at a time (see the module docstring)

    def _encode(self, messages):
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages, max_tokens):
        """Token ids of the prompt within max_seq_len - max_tokens: the leading system message(s) and the
        most recent messages that fit, starting at a user message. BadRequest if even the last user
        message alone does not fit."""
        budget = self.max_seq_len - max_tokens
        msgs = [{"role": m.role, "content": m.text()} for m in messages]
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
            ids = self._encode(msgs[:n_sys] + msgs[starts[mid]:])
            if len(ids) <= budget:
                best, hi = ids, mid - 1
            else:
                lo = mid + 1
        if best is not None:
            return best
        ids = self._encode(msgs[starts[-1]:])  # drop the system prompt as a last resort
        if len(ids) <= budget:
            return ids
        raise self._too_long(len(ids), budget)

    def _too_long(self, n, budget):
        return BadRequest(f"the last user message needs {n} prompt tokens but only {budget} fit "
                          f"(max_seq_len {self.max_seq_len} - max_tokens {self.max_seq_len - budget}); "
                          f"shorten it or lower max_tokens", "messages", "context_length_exceeded")

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
        ids = self.prompt_ids(req.messages, max_tokens)
        seed = req.seed if req.seed is not None else random.getrandbits(63)
        return dict(ids=ids, max_tokens=max_tokens, seed=seed,
                    temperature=self.temperature if req.temperature is None else req.temperature,
                    top_p=self.top_p if req.top_p is None else req.top_p,
                    top_k=req.top_k or 0, repetition_penalty=req.repetition_penalty or 1.0)

    def token_ids(self, job, stats):
        """Yield new token ids for one request. Its KV cache and random generator belong to this call
        alone; only the model steps themselves take the shared lock."""
        generator = torch.Generator(device=self.device).manual_seed(job["seed"])
        input_ids = torch.tensor([job["ids"]], device=self.device)
        steps = self.model.stream_generate(
            input_ids, max_new_tokens=job["max_tokens"], temperature=job["temperature"], top_p=job["top_p"],
            top_k=job["top_k"], repetition_penalty=job["repetition_penalty"],
            eos_token_id=self.tokenizer.eos_token_id, generator=generator)
        try:
            while True:
                with self.lock:
                    try:
                        tid = next(steps)
                    except StopIteration:
                        break
                stats["completion_tokens"] += 1
                yield tid
        finally:
            steps.close()
        stats["finish_reason"] = "length" if stats["completion_tokens"] >= job["max_tokens"] else "stop"

    def deltas(self, job, stats):
        """(field, text) pieces of the reply, reasoning split off."""
        stats.update(completion_tokens=0, finish_reason="stop", reasoning=False)
        splitter = ReplySplitter()
        for piece in stream_text(self.tokenizer, self.token_ids(job, stats)):
            yield from splitter.feed(piece)
        yield from splitter.finish()
        stats["reasoning"] = splitter.reasoning

    def usage(self, job, stats):
        p, c = len(job["ids"]), stats["completion_tokens"]
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# ----------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------
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
                                            "owned_by": "minimind"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        job = engine.prepare(req)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse_events(engine, job, rid, created, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run_in_threadpool(complete, engine, job, rid, created)

    engine.created = int(time.time())
    return app


def complete(engine, job, rid, created):
    stats = {}
    parts = {"reasoning_content": [], "content": []}
    for field, text in engine.deltas(job, stats):
        parts[field].append(text)
    message = {"role": "assistant", "content": "".join(parts["content"])}
    if stats["reasoning"]:
        message["reasoning_content"] = "".join(parts["reasoning_content"])
    return {"id": rid, "object": "chat.completion", "created": created, "model": engine.name,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": stats["finish_reason"]}],
            "usage": engine.usage(job, stats)}


def sse_events(engine, job, rid, created, include_usage):
    """A sync generator: Starlette runs each step in a worker thread, so the event loop stays free."""
    def chunk(delta, finish_reason=None):
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    stats = {}
    yield chunk({"role": "assistant"})
    try:
        for field, text in engine.deltas(job, stats):
            yield chunk({field: text})
    except Exception as e:  # noqa: BLE001 - the status line is already sent; report in-stream
        yield f"data: {json.dumps(error_body(f'generation failed: {type(e).__name__}: {e}', 'server_error'))}\n\n"
        yield "data: [DONE]\n\n"
        return
    yield chunk({}, stats["finish_reason"])
    if include_usage:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                "choices": [], "usage": engine.usage(job, stats)}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, weight_help="a native .pth to serve (default: picked by --model_mode/--out_dir/--dim/--use_moe)")
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
    return p


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
    return Engine(model, tokenizer, args.served_model_name or f"minimind-{name}", torch.device(args.device),
                  args.max_seq_len, args.max_tokens, args.temperature, args.top_p, raw_prompt=raw)


def main(argv=None):
    import uvicorn
    args = build_parser().parse_args(argv)
    engine = load_engine(args)
    print(f"serving {engine.name} on http://{args.host}:{args.port}/v1 (device {args.device}, max_seq_len {args.max_seq_len})", flush=True)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    run_main(main)
