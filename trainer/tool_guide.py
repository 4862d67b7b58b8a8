"""Schema-guided tool calls: inside a <tool_call> block the model may only write tokens that keep the block a
well-formed call to one of the offered tools, {"name": <a tool's name>, "arguments": <an object its parameters
schema allows>}, closed by </tool_call>. Outside the blocks only a stray </tool_call> is refused. A small model picks the tool
and the numbers; the guide keeps its JSON parseable (the demo's 1.6M model, left free, sometimes runs a
calculator expression on into another tool's fields: `{"expression": "6, "from": "f", "to": "kg"}`).
llama.cpp applies a grammar to tool calls the same way, from the opening tag on.

    guide = ToolCallGuide(tokenizer, schemas, prompt_len=ids.shape[1])   # schemas: the request's `tools`
    model.generate(ids, logits_processor=LogitsProcessorList([guide]))   # transformers
    model.stream_generate(ids, logits_processor=guide)                   # ours, eval_model.py and the server

It works on bytes (byte-level BPE splits characters) with a small pushdown automaton over the JSON, one
immutable state per position, so each candidate token is checked by feeding only its own bytes. Per step it
checks the `top_k` likeliest tokens and keeps those that fit (their scores unchanged, the rest -inf); only if
none fits does it scan the whole vocabulary. Greedy decoding therefore picks the likeliest token that fits;
sampling samples among the fitting ones of the top_k.

What a schema can say here: `type` (string, number, integer, boolean, null, object, array, or a list of
them), `enum` of strings, a string's `pattern` (a regular expression the string must contain a match of, as
JSON Schema says; anchor it with ^...$ to match the whole string: every character written must keep a match
possible, and the string closes only on a match; such a string is written without backslash escapes), its
`minLength` and `maxLength` (in characters; an escape sequence counts as one), object
`properties` (the only keys allowed, each at most once) and `required` (the object closes only once they are
all there), array `items`. Anything else allows any JSON value.
The JSON is compact, as the chat template writes calls: at most one whitespace character in a row, so a
model pushed off its track cannot stall in spaces and newlines.
"""
import functools
import itertools
import weakref

import regex  # partial matching: can what is written so far still become a match?
import torch

WHITESPACE = frozenset(b" \t\n\r")
MAX_WHITESPACE = 1  # in a row
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
# number phases after each byte; the ones in NUMBER_DONE may end the number
NUMBER_DONE = {"zero", "int", "frac", "exp"}


def _byte_decoder():
    """GPT-2's byte-level alphabet, reversed: the printable character each byte is written as -> the byte."""
    shown = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(shown), 0
    for b in range(256):
        if b not in shown:
            shown.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(shown, chars)}


def token_bytes(tokenizer):
    """Each token id's bytes (None for special/added tokens such as <|im_end|> or <tool_call>)."""
    decoder, special = _byte_decoder(), set(tokenizer.added_tokens_decoder)
    out = []
    for i in range(len(tokenizer)):
        if i in special:
            out.append(None)
            continue
        piece = tokenizer.convert_ids_to_tokens(i)
        if all(ch in decoder for ch in piece):
            out.append(bytes(decoder[ch] for ch in piece))
        else:  # not a byte-level vocabulary
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out


class Vocabulary:
    """What the guides need of a tokenizer, computed once per tokenizer (see `vocabulary`): each token's bytes,
    and (on first need) the tokens by their first byte."""

    def __init__(self, tokenizer):
        self.bytes = token_bytes(tokenizer)
        self._by_first_byte = None

    def by_first_byte(self):
        if self._by_first_byte is None:
            buckets = {}
            for tid, data in enumerate(self.bytes):
                if data:
                    buckets.setdefault(data[0], []).append(tid)
            self._by_first_byte = {b: torch.tensor(ids) for b, ids in buckets.items()}
        return self._by_first_byte


_VOCABULARIES = weakref.WeakKeyDictionary()


def vocabulary(tokenizer):
    """The tokenizer's Vocabulary, made on first use and kept while the tokenizer lives (again if it grew)."""
    vocab = _VOCABULARIES.get(tokenizer)
    if vocab is None or len(vocab.bytes) != len(tokenizer):
        vocab = _VOCABULARIES[tokenizer] = Vocabulary(tokenizer)
    return vocab


def clean_schema(schema):
    """The part of a JSON schema the guide enforces (see the module docstring); None: any JSON value. A
    client's schema may be anything: what is not understood here is simply not enforced."""
    if not isinstance(schema, dict):
        return None
    out = {}
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types
    if isinstance(types, list) and types and all(isinstance(t, str) for t in types):
        out["type"] = types
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        out["enum"] = enum
    free_string = "enum" not in out and "string" in out.get("type", ["string"])
    lo, hi = schema.get("minLength"), schema.get("maxLength")
    is_count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if free_string and (lo is None or is_count(lo)) and (hi is None or is_count(hi)) and (hi is None or (lo or 0) <= hi):
        out.update({k: v for k, v in (("minLength", lo), ("maxLength", hi)) if v is not None})  # (no string meets lo > hi: not enforced)
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and free_string:
        try:
            out["pattern"] = regex.compile(pattern)
        except regex.error:
            pass  # a pattern this regex dialect does not read is not enforced
    props = schema.get("properties")
    if isinstance(props, dict) and "object" in out.get("type", ["object"]):
        out["properties"] = {str(k): clean_schema(v) for k, v in props.items()}
        required = schema.get("required")
        out["required"] = [k for k in required if k in props] if isinstance(required, list) else []
    if "items" in schema and "array" in out.get("type", ["array"]):
        out["items"] = clean_schema(schema["items"])
    return out or None


def call_schema(tools):
    """The JSON of one call to any of `tools` (OpenAI tool schemas), name first, then its arguments."""
    params = {}
    for t in tools:
        fn = t.get("function", t)
        params[fn["name"]] = clean_schema(fn.get("parameters")) or {"type": ["object"]}
    return {"type": ["object"], "properties": {"name": {"type": ["string"], "enum": list(params)}, "arguments": None},
            "required": ["name", "arguments"], "ordered": True, "arguments_by_name": params}


# ------------------------------------------------------------------------------------------------------------
# The automaton. A state is (frames, whitespace run); frames are tuples, the innermost last:
#   ("end",)                           the call is complete: only whitespace, then </tool_call>
#   ("value", schema)                  a JSON value is due
#   ("str", choices, sofar, escape, size)  in a string; choices: the bytes it must equal (or None); escape: 0,
#                                      or 1 just after a backslash, 2-5: that many \u hex digits to go, plus one;
#                                      size: None, or (characters so far, minLength, maxLength or None)
#   ("pat", pattern, sofar, size)      in a string that must match `pattern` (compiled); sofar: its bytes
#   ("num", integer, phase)            in a number
#   ("lit", rest)                      in true/false/null: the bytes still due
#   ("obj", schema, seen, phase, name) in an object: phase first | key | colon | next; seen: keys so far;
#                                      name: the call's tool name once read (to pick its arguments schema)
#   ("arr", schema, phase)             in an array: phase first | item | next
# ------------------------------------------------------------------------------------------------------------
def start_state(schema):
    return ((("end",), ("value", schema)), 0)


def _types(schema):
    return schema.get("type") if schema else None


def _string_choices(schema):
    enum = (schema or {}).get("enum")  # clean_schema keeps only enums of strings
    return tuple(v.encode("utf-8") for v in enum) if enum else None


def _string_size(schema):
    """(0 characters so far, minLength, maxLength) when the schema limits a string's length, else None."""
    lo, hi = (schema or {}).get("minLength", 0), (schema or {}).get("maxLength")
    return (0, lo, hi) if lo or hi is not None else None


def _grow(size, b):
    """A string's size after byte b: a byte that starts a character (not a UTF-8 continuation byte; an escape
    sequence counts once, at its backslash) adds one. False: one character more than maxLength."""
    if size is None or b & 0xC0 == 0x80:
        return size
    count, lo, hi = size
    return False if hi is not None and count >= hi else (count + 1, lo, hi)


def _long_enough(size):
    return size is None or size[0] >= size[1]


def _keys_left(schema, seen):
    """Keys the object may still take (None: any key)."""
    props = (schema or {}).get("properties")
    if props is None:
        return None
    left = [k for k in props if k not in seen]
    return left[:1] if schema.get("ordered") else left


def _may_close(schema, seen):
    return all(k in seen for k in (schema or {}).get("required", []))


def _open_value(frames, schema, b):
    """The first byte of a value of `schema` -> the frames after it, or None."""
    types = _types(schema)
    allowed = lambda *names: types is None or any(n in types for n in names)  # noqa: E731
    if b == ord('"') and allowed("string"):
        if schema and "pattern" in schema:
            return frames + (("pat", schema["pattern"], b"", _string_size(schema)),)
        return frames + (("str", _string_choices(schema), b"", 0, _string_size(schema)),)
    if (b == ord("-") or b in DIGITS) and allowed("number", "integer"):
        integer = types is not None and "integer" in types and "number" not in types
        return frames + (("num", integer, "sign" if b == ord("-") else "zero" if b == ord("0") else "int"),)
    if b == ord("{") and allowed("object"):
        return frames + (("obj", schema, (), "first", None),)
    if b == ord("[") and allowed("array"):
        return frames + (("arr", (schema or {}).get("items"), "first"),)
    if b in LITERALS and allowed({ord("t"): "boolean", ord("f"): "boolean", ord("n"): "null"}[b]):
        return frames + (("lit", LITERALS[b]),)
    return None


def _value_done(frames, value=None):
    """A string, number, literal, object or array just ended; its parent moves on. `value`: the bytes of a
    string that had choices (an object key, or the call's tool name), which the parent object records."""
    top = frames[-1]
    if top[0] == "obj" and value is not None:
        _, schema, seen, phase, name = top
        if phase == "colon":  # the string was a key
            return frames[:-1] + (("obj", schema, seen + (value.decode("utf-8"),), "colon", name),)
        if seen[-1:] == ("name",) and schema and "arguments_by_name" in schema:  # the call's tool name
            return frames[:-1] + (("obj", schema, seen, "next", value.decode("utf-8")),)
    return frames


def _number_phase(phase, b, integer):
    """The number's phase after byte b, or None if b cannot continue it."""
    digit = b in DIGITS
    if phase == "sign":
        return ("zero" if b == ord("0") else "int") if digit else None
    if phase in ("int", "frac", "exp") and digit:
        return phase
    if phase in ("zero", "int") and b == ord(".") and not integer:
        return "dot"
    if phase in ("zero", "int", "frac") and b in b"eE" and not integer:
        return "e"
    if phase == "dot":
        return "frac" if digit else None
    if phase == "e" and b in b"+-":
        return "esign"
    if phase in ("e", "esign"):
        return "exp" if digit else None
    return None


@functools.lru_cache(maxsize=65536)
def _pattern_allows(pattern, data, done=False):
    """Whether a string whose bytes so far are `data` can still match `pattern` (done: it is closing now and
    must match). Bytes that end in the middle of a character (byte-level tokens split characters) fit if some
    character they can still become fits: its candidates are tried, at most 4096 (a four-byte character missing
    three bytes is tried with its last byte 0x80 only: that can refuse a fitting token, never strand a call)."""
    try:
        return pattern.search(data.decode("utf-8"), partial=not done) is not None
    except UnicodeDecodeError as e:
        if done or e.reason != "unexpected end of data":
            return False
        head, tail = data[:e.start], data[e.start:]
        size = 4 if tail[0] >= 0xF0 else 3 if tail[0] >= 0xE0 else 2  # from the lead byte
        missing = size - len(tail)
        text = head.decode("utf-8")
        fill = [range(0x80, 0xC0)] * min(missing, 2) + [[0x80]] * max(missing - 2, 0)
        for rest in itertools.product(*fill):
            try:
                ch = (tail + bytes(rest)).decode("utf-8")
            except UnicodeDecodeError:
                continue
            if pattern.search(text + ch, partial=True) is not None:
                return True
        return False


def _member_schema(schema, key, name):
    if key == "arguments" and "arguments_by_name" in (schema or {}):
        return schema["arguments_by_name"].get(name)
    props = (schema or {}).get("properties")
    return props.get(key) if props and key is not None else None


def step(state, b):
    """Feed one byte. Returns the next state, or None when no call can continue so."""
    frames, ws = state
    top = frames[-1]
    kind = top[0]
    if kind == "str":
        _, choices, sofar, escape, size = top
        if escape == 1:
            if b == ord("u"):
                return frames[:-1] + (("str", choices, sofar, 5, size),), 0
            return (frames[:-1] + (("str", choices, sofar, 0, size),), 0) if b in ESCAPES else None
        if escape > 1:
            return (frames[:-1] + (("str", choices, sofar, 0 if escape == 2 else escape - 1, size),), 0) if b in HEX else None
        if b == ord('"'):
            if choices is None:
                return (_value_done(frames[:-1]), 0) if _long_enough(size) else None
            return (_value_done(frames[:-1], sofar), 0) if sofar in choices else None
        if b < 0x20:
            return None
        if choices is None:
            if size is None and b != ord("\\"):
                return frames, 0
            size = _grow(size, b)
            return (frames[:-1] + (("str", None, b"", int(b == ord("\\")), size),), 0) if size is not False else None
        sofar += bytes([b])  # no escapes in keys and names: they are written plainly
        return (frames[:-1] + (("str", choices, sofar, 0, None),), 0) if any(c.startswith(sofar) for c in choices) else None
    if kind == "pat":
        _, pattern, sofar, size = top
        if b == ord('"'):
            return (_value_done(frames[:-1]), 0) if _long_enough(size) and _pattern_allows(pattern, sofar, done=True) else None
        if b < 0x20 or b == ord("\\"):
            return None
        size = _grow(size, b)
        if size is False:
            return None
        sofar += bytes([b])
        return (frames[:-1] + (("pat", pattern, sofar, size),), 0) if _pattern_allows(pattern, sofar) else None
    if kind == "num":
        _, integer, phase = top
        nxt = _number_phase(phase, b, integer)
        if nxt is not None:
            return frames[:-1] + (("num", integer, nxt),), 0
        if phase not in NUMBER_DONE:
            return None
        return step((_value_done(frames[:-1]), 0), b)  # the byte after a number belongs to its parent
    if kind == "lit":
        rest = top[1]
        if b != rest[0]:
            return None
        return (frames[:-1] + (("lit", rest[1:]),), 0) if len(rest) > 1 else (_value_done(frames[:-1]), 0)
    if b in WHITESPACE:
        return (frames, ws + 1) if ws < MAX_WHITESPACE else None
    if kind == "value":
        opened = _open_value(frames[:-1], top[1], b)
        return (opened, 0) if opened else None
    if kind == "obj":
        _, schema, seen, phase, name = top
        if phase in ("first", "key") and b == ord('"'):
            left = _keys_left(schema, seen)
            choices = None if left is None else tuple(k.encode("utf-8") for k in left)
            if choices == ():
                return None
            return frames[:-1] + (("obj", schema, seen, "colon", name), ("str", choices, b"", 0, None)), 0
        if phase == "colon" and b == ord(":"):
            value = ("value", _member_schema(schema, seen[-1] if seen else None, name))
            return frames[:-1] + (("obj", schema, seen, "next", name), value), 0
        if phase in ("first", "next") and b == ord("}"):
            return (_value_done(frames[:-1]), 0) if _may_close(schema, seen) else None
        if phase == "next" and b == ord(","):
            return (frames[:-1] + (("obj", schema, seen, "key", name),), 0) if _keys_left(schema, seen) != [] else None
        return None
    if kind == "arr":
        _, items, phase = top
        if phase in ("first", "next") and b == ord("]"):
            return _value_done(frames[:-1]), 0
        if phase == "next" and b == ord(","):
            return frames[:-1] + (("arr", items, "item"),), 0
        if phase in ("first", "item"):
            opened = _open_value(frames[:-1] + (("arr", items, "next"),), items, b)
            return (opened, 0) if opened else None
        return None
    return None  # "end": only whitespace


def feed(state, data):
    """Feed bytes; None as soon as one does not fit."""
    for b in data:
        state = step(state, b)
        if state is None:
            return None
    return state


def single_token_id(tokenizer, tag):
    """The id of a tag the tokenizer keeps as one token, or None (an older vocabulary splits it)."""
    tid = tokenizer.convert_tokens_to_ids(tag)
    return tid if isinstance(tid, int) and tokenizer.convert_ids_to_tokens(tid) == tag else None


def can_guide(tokenizer):
    """Whether the tokenizer keeps <tool_call> and </tool_call> as single tokens (ours does; an older
    vocabulary splits them, and its model's calls are left unguided)."""
    return all(single_token_id(tokenizer, tag) is not None for tag in ("<tool_call>", "</tool_call>"))


def is_done(state):
    return state[0][-1][0] == "end"


def restrict(scores, row, top_k, fits, fallback):
    """Keep, of row's `top_k` likeliest tokens, those that fit (scores unchanged); -inf for the rest. If none of
    them fits, the likeliest token that fits among `fallback()` (the ids that can)."""
    order = scores[row].topk(min(top_k, scores.shape[1])).indices.tolist()
    keep = [t for t in order if fits(t)]
    if not keep:
        ids = fallback().to(scores.device)
        keep = next(([t] for t in ids[scores[row, ids].argsort(descending=True)].tolist() if fits(t)), None)
        if keep is None:
            return
    masked = torch.full_like(scores[row], float("-inf"))
    idx = torch.tensor(keep, device=scores.device)
    masked[idx] = scores[row, idx]
    scores[row] = masked


class StateCache:
    """Per batch row, the automaton's state after the tokens of the part being guided, fed one more token per
    step (the part is fed anew when it is not the last step's part plus new tokens, e.g. a new block)."""

    def __init__(self, schema, vocab):
        self.schema, self.vocab, self.bytes, self.rows = schema, vocab, vocab.bytes, {}

    def state(self, row, part):
        fed, state = self.rows.get(row, ((), None))
        if not fed or part[:len(fed)] != list(fed):
            fed, state = (), start_state(self.schema)
        for tid in part[len(fed):]:
            state = None if state is None or self.bytes[tid] is None else feed(state, self.bytes[tid])
        self.rows[row] = (tuple(part), state)
        return state

    def fits(self, state, tid):
        data = self.bytes[tid]
        return data is not None and feed(state, data) is not None

    def could_fit(self, state, special_ids):
        """The ids worth trying when none of the likeliest fits: the tokens whose first byte the state takes (in
        a key or a tool name only a letter or two), and `special_ids`."""
        parts = [ids for b, ids in self.vocab.by_first_byte().items() if step(state, b) is not None]
        return torch.cat(parts + [torch.tensor(special_ids, dtype=torch.long)])


class ToolCallGuide:
    """A logits processor (transformers' shape: (input_ids [B, T], scores [B, V]) -> scores) that keeps every
    <tool_call> block the model writes after the prompt a well-formed call to one of `tools` (OpenAI tool
    schemas). `names`: the tools a call may name, if fewer than `tools` (tool_choice naming one function).
    `required`: the reply must make a call (tool_choice "required" or naming a function): once any think
    block is closed, a reply that has not opened a <tool_call> yet can only open one. `max_calls`: after that
    many calls no other block may open (parallel_tool_calls false: 1)."""

    def __init__(self, tokenizer, tools, prompt_len, top_k=64, names=None, required=False, max_calls=None):
        tools = [t for t in tools if names is None or t.get("function", t)["name"] in names]
        if not tools:
            raise ValueError("ToolCallGuide needs at least one tool")
        self.open_id, self.close_id, *self.think_ids = (single_token_id(tokenizer, tag) for tag in
                                                        ("<tool_call>", "</tool_call>", "<think>", "</think>"))
        if self.open_id is None or self.close_id is None:
            raise ValueError("this tokenizer has no <tool_call> and </tool_call> tokens: retrain it with train_tokenizer.py")
        self.cache = StateCache(call_schema(tools), vocabulary(tokenizer))
        self.schema = self.cache.schema
        self.prompt_len, self.top_k, self.required, self.max_calls = prompt_len, top_k, required, max_calls

    def block_state(self, row, generated):
        """The automaton's state after the open block in `generated` (the row's new token ids), or None when
        the row is not inside a block (or wrote one the guide did not see, which it leaves alone)."""
        if self.open_id not in generated:
            return None
        start = len(generated) - generated[::-1].index(self.open_id)  # just after the last <tool_call>
        if self.close_id in generated[start:]:
            return None
        return self.cache.state(row, generated[start:])

    def must_open(self, row_ids, generated):
        """tool_choice required: no call yet, and not inside a think block (pre-filled by the prompt or not)."""
        if not self.required or self.open_id in generated:
            return False
        last = [max((i for i, x in enumerate(row_ids) if x == t), default=-1) for t in self.think_ids]
        return last[0] <= last[1]

    def __call__(self, input_ids, scores):
        for row in range(input_ids.shape[0]):
            row_ids = input_ids[row].tolist()
            generated = row_ids[self.prompt_len:]
            state = self.block_state(row, generated)
            if state is not None:
                restrict(scores, row, self.top_k, lambda t: is_done(state) if t == self.close_id else self.cache.fits(state, t),
                         lambda: self.cache.could_fit(state, [self.close_id]))
            elif self.must_open(row_ids, generated):
                scores[row] = torch.where(torch.arange(scores.shape[1], device=scores.device) == self.open_id,
                                          0.0, float("-inf"))
            else:
                if row_ids.count(self.open_id) <= row_ids.count(self.close_id):  # no block open, here or in the prompt
                    scores[row, self.close_id] = float("-inf")  # a stray </tool_call> would only be noise in the text
                if self.max_calls is not None and generated.count(self.close_id) >= self.max_calls:
                    scores[row, self.open_id] = float("-inf")
        return scores


class JsonReplyGuide:
    """A logits processor that makes the whole reply one JSON value that `schema` allows (a JSON schema, see
    clean_schema; {"type": "object"}: any object), then the end token: the server's response_format
    json_object / json_schema."""

    def __init__(self, tokenizer, schema, prompt_len, top_k=64):
        self.cache = StateCache(clean_schema(schema), vocabulary(tokenizer))
        self.eos_id, self.prompt_len, self.top_k = tokenizer.eos_token_id, prompt_len, top_k

    def __call__(self, input_ids, scores):
        for row in range(input_ids.shape[0]):
            state = self.cache.state(row, input_ids[row, self.prompt_len:].tolist())
            if state is not None:
                restrict(scores, row, self.top_k, lambda t: is_done(state) if t == self.eos_id else self.cache.fits(state, t),
                         lambda: self.cache.could_fit(state, [self.eos_id]))
        return scores
