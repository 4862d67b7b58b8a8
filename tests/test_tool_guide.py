"""trainer/tool_guide.py: inside a <tool_call> block only a well-formed call to an offered tool can be written."""
import json
import random

import pytest
import torch

from dataset.lm_dataset import load_tokenizer, render_chat
from trainer.tool_guide import ToolCallGuide, call_schema, feed, start_state, step, token_bytes
from trainer.tools import TOOLS, ToolError, check_arguments

SCHEMAS = [t.schema for t in TOOLS.values()]
CALL = call_schema(SCHEMAS)
BROKEN = '\n{"name": "calculator", "arguments": {"expression": "6, "from": "f", "to": "kg"}}\n'  # the demo model's miss


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def vocab(tok):
    return token_bytes(tok)


def verdict(text, schema=CALL):
    state = feed(start_state(schema), text.encode("utf-8"))
    return "invalid" if state is None else "complete" if state[0][-1][0] == "end" else "prefix"


def is_valid_call(text, tools=TOOLS):
    """What the runner accepts: a JSON object naming one of the tools, its arguments right for the schema."""
    try:
        call = json.loads(text)
        check_arguments(tools[call["name"]], call["arguments"])
        return set(call) == {"name", "arguments"}
    except (ValueError, KeyError, TypeError, ToolError):
        return False


@pytest.mark.parametrize("text,want", [
    ('\n{"name": "calculator", "arguments": {"expression": "851 * 39"}}\n', "complete"),
    ('{"name": "units", "arguments": {"value": -13.5e2, "from": "c", "to": "f"}}', "complete"),
    ('{"name": "dates", "arguments": {"start": "2021-05-20", "days": 37}}', "complete"),
    ('{"name": "units", "arguments": {"value": 1, "from": "a\\"b\\u00e9\\n", "to": "计算"}}', "complete"),  # escapes, UTF-8
    ('{"name": "calc', "prefix"),
    ('{"name": "units", "arguments": {"value": 1, "from": "6, "', "prefix"),  # a string may hold ", "
    # patterned strings (the calculator's expression, the dates): every byte keeps a match possible
    ('{"name": "calculator", "arguments": {"expression": "(8.5 - 1) * 2 // 3 % 4"}}', "complete"),
    ('{"name": "calculator", "arguments": {"expression": "839 + 41', "prefix"),
    ('{"name": "calculator", "arguments": {"expression": "839 + 41得', "invalid"),  # the question's words run on
    ('{"name": "calculator", "arguments": {"expression": "6, "', "invalid"),
    ('{"name": "calculator", "arguments": {"expression": ""}}', "invalid"),  # closes only on a match
    ('{"name": "dates", "arguments": {"start": "2021-05-2', "prefix"),
    ('{"name": "dates", "arguments": {"start": "2021-5-20"}}', "invalid"),
    ('{"name": "dates", "arguments": {"start": "2021-05-20", "end": "2021-06-261"}}', "invalid"),
    ('{"name": "dates", "arguments": {"start": "2021\\u002d05-20"}}', "invalid"),  # no escapes in a patterned string
    (BROKEN, "invalid"),  # ... but calculator has no argument "from"
    ('{"name": "calx', "invalid"),  # not an offered tool
    ('{"arguments": {}}', "invalid"),  # the name comes first
    ('{"name": "units", "arguments": {"value": "13", "from": "c", "to": "f"}}', "invalid"),  # value is a number
    ('{"name": "units", "arguments": {"value": 13, "from": "c"}}', "invalid"),  # "to" is required
    ('{"name": "dates", "arguments": {"start": "2021-05-20", "days": 1.5}}', "invalid"),  # days is an integer
    ('{"name": "dates", "arguments": {"start": "x", "start": "y"}}', "invalid"),  # a key only once
    ('{"name": "dates", "arguments": {"start": 01}}', "invalid"),  # not a JSON number, and not a string
    ('{"name": "calculator", "arguments": {"expression": "1"}}, ', "invalid"),  # one call per block
    ('{"name": "calculator", "arguments": {"expression": "1"}}  ', "invalid"),  # compact: one space at most
    ('{"name": "calculator", "arguments": {"expression": "a\x01"}}', "invalid"),  # control characters are escaped in JSON
])
def test_what_a_block_may_hold(text, want):
    assert verdict(text) == want
    if want == "complete":
        assert is_valid_call(text)


def test_calls_the_chat_template_writes_are_allowed_at_every_byte(tok):
    """Every call of the demo's tool data, rendered by the shipped template, is a valid prefix byte by byte."""
    calls = [("calculator", {"expression": "(693 + 4) / 29"}), ("units", {"value": 12.5, "from": "km", "to": "mi"}),
             ("units", {"value": -40, "from": "c", "to": "f"}), ("dates", {"start": "2029-07-25"}),
             ("dates", {"start": "2021-05-20", "end": "2021-06-26"}), ("dates", {"start": "2021-05-20", "days": -3})]
    for name, args in calls:
        text = render_chat(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": args}}]}], SCHEMAS)
        body = text.rsplit("<tool_call>", 1)[1].split("</tool_call>")[0]
        state = start_state(CALL)
        for b in body.encode("utf-8"):
            state = step(state, b)
            assert state is not None, (name, body)
        assert state[0][-1][0] == "end"


def random_value(schema, rng):
    kind = schema["type"]
    if kind == "string" and "pattern" in schema:
        return rng.choice(["2021-05-20", "1999-12-31"] if "d{4}" in schema["pattern"] else ["1 + 2", "(3.5 - 1) * 2", "7 // 2 % 3"])
    if kind == "string":
        return rng.choice(["", "x", "2021-05-20", 'a"b', "1 + 2", "计算", "\\", "\t"])
    if kind == "integer":
        return rng.randint(-1000, 1000)
    if kind == "number":
        return rng.choice([rng.randint(-99, 99), rng.uniform(-1e6, 1e6), 1e-7])
    raise ValueError(kind)


def test_random_valid_calls_are_allowed_and_random_walks_end_only_in_valid_calls():
    rng = random.Random(0)
    for _ in range(300):  # every valid call, as json.dumps writes it, is allowed
        tool = rng.choice(list(TOOLS.values()))
        props, required = tool.parameters["properties"], tool.parameters["required"]
        keys = required + [k for k in props if k not in required and rng.random() < 0.5]
        if tool.name == "dates" and {"days", "end"} <= set(keys):
            keys.remove("end")
        args = {k: random_value(props[k], rng) for k in rng.sample(keys, len(keys))}
        text = json.dumps({"name": tool.name, "arguments": args}, ensure_ascii=rng.random() < 0.5)
        assert verdict(text) == "complete", text
    alphabet = list(b'{}[]":, \n-0123456789.eE+abcdefghijklmnopqrstuvwxyz\\') + [0xE8, 0xAE, 0xA1]
    ended = 0
    for _ in range(300):  # bytes drawn at random among those the guide allows: whatever completes is a valid call
        state, text = start_state(CALL), b""
        for _ in range(120):
            if state[0][-1][0] == "end":
                break
            allowed = [(b, s) for b in alphabet if (s := step(state, b)) is not None]
            assert allowed, text  # never a dead end
            closing = [a for a in allowed if a[0] in b'"}']
            b, state = rng.choice(closing if closing and rng.random() < 0.3 else allowed)
            text += bytes([b])
        if state[0][-1][0] == "end":
            ended += 1
            assert is_valid_call(text.decode("utf-8", errors="replace")), text
    assert ended > 50


def test_client_schemas_beyond_the_three_tools():
    schemas = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": ["b"], "properties": {
                   "a": "not a schema", "b": {"type": "array", "items": {"type": "integer"}}, "c": {"type": "object"},
                   "d": {"type": "string", "enum": ["red", "green"]}, "e": {"type": ["string", "null"]}}}}},
               {"type": "function", "function": {"name": "g"}}]  # no parameters: any arguments object
    schema = call_schema(schemas)
    assert verdict('{"name": "f", "arguments": {"a": [1, {"x": null}], "b": [1, 2], "c": {"k": true}, "d": "green", "e": null}}',
                   schema) == "complete"
    for bad in ['{"name": "f", "arguments": {"b": [1.5]}}', '{"name": "f", "arguments": {}}',
                '{"name": "f", "arguments": {"b": [], "d": "blue"}}', '{"name": "f", "arguments": {"b": [], "e": 1}}',
                '{"name": "f", "arguments": {"b": [], "z": 1}}']:
        assert verdict(bad, schema) == "invalid", bad
    assert verdict('{"name": "g", "arguments": {"any": [1, "x"]}}', schema) == "complete"


def block_prefix(tok, text):
    """A prompt, then the model's <tool_call> and the text it has written of the block."""
    prompt = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    return prompt, prompt + [tok.convert_tokens_to_ids("<tool_call>")] + tok.encode(text, add_special_tokens=False)


def test_guide_keeps_the_likeliest_token_that_fits(tok):
    prompt, ids = block_prefix(tok, '\n{"name": "units", "arguments": {"value": 6, "from": "c", "to": "f"')
    free = torch.tensor([tok.encode(" plain reply", add_special_tokens=False)])
    guide = ToolCallGuide(tok, SCHEMAS, len(prompt))
    scores = torch.zeros(2, len(tok))
    wants = {"from": 10.0, "}}": 5.0, "}": 4.0, "<|im_end|>": 8.0, "</tool_call>": 9.0}
    for piece, s in wants.items():
        scores[:, tok.convert_tokens_to_ids(piece)] = s
    width = max(len(ids), free.shape[1] + len(prompt))
    rows = torch.tensor([[0] * (width - len(ids)) + ids, [0] * (width - len(prompt) - free.shape[1]) + prompt + free[0].tolist()])
    guide.prompt_len = width - len(ids) + len(prompt)  # left padding: both rows' prompts end there
    out = guide(rows, scores.clone())
    assert tok.convert_ids_to_tokens(int(out[0].argmax())) == "}}"  # not "from", not the end: they cannot follow
    assert torch.isinf(out[0, tok.convert_tokens_to_ids("</tool_call>")]) and out[0, tok.convert_tokens_to_ids("}")] == 4.0
    close = tok.convert_tokens_to_ids("</tool_call>")
    assert torch.isinf(out[1, close])  # outside a block a stray </tool_call> cannot be written ...
    out[1, close] = scores[1, close]
    assert torch.equal(out[1], scores[1])  # ... and nothing else changes
    _, done = block_prefix(tok, '\n{"name": "calculator", "arguments": {"expression": "6"}}\n')
    out = ToolCallGuide(tok, SCHEMAS, len(prompt))(torch.tensor([done]), scores[:1].clone())
    assert int(out[0].argmax()) == tok.convert_tokens_to_ids("</tool_call>")  # complete: it may close now


def test_guided_greedy_decoding_of_random_scores_writes_only_valid_calls(tok, vocab):
    """Token by token, as generation calls it: the cached state stays the state of the text written so far."""
    prompt, ids = block_prefix(tok, "")
    closers = [i for i, b in enumerate(vocab) if b and (b'"' in b or b"}" in b)] + [tok.convert_tokens_to_ids("</tool_call>")]
    closed = 0
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        guide, seq = ToolCallGuide(tok, SCHEMAS, len(prompt)), list(ids)
        for _ in range(80):
            scores = torch.randn(1, len(tok), generator=gen)
            scores[0, closers] += 2.5
            nxt = int(guide(torch.tensor([seq]), scores)[0].argmax())
            seq.append(nxt)
            body = seq[len(ids):]
            if nxt == guide.close_id:
                text = tok.decode(body[:-1])
                assert is_valid_call(text), text
                closed += 1
                break
            assert feed(start_state(CALL), b"".join(vocab[t] for t in body)) is not None
    assert closed >= 6


def test_stream_generate_calls_the_processor_with_the_ids_so_far(tok):
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               num_key_value_heads=1, vocab_size=len(tok))).eval()
    seen = []

    def only_token_42(input_ids, scores):
        seen.append(input_ids[0].tolist())
        scores[:, :] = float("-inf")
        scores[:, 42] = 0.0
        return scores

    out = list(model.stream_generate(torch.tensor([[5, 6]]), max_new_tokens=3, temperature=0.9, eos_token_id=-1,
                                     logits_processor=only_token_42))
    assert out == [42, 42, 42] and seen == [[5, 6], [5, 6, 42], [5, 6, 42, 42]]


def test_required_opens_a_call_once_any_think_block_is_closed(tok):
    think = tok.encode("<|im_start|>assistant\n<think>\n", add_special_tokens=False)  # enable_thinking pre-fills this
    guide = ToolCallGuide(tok, SCHEMAS, len(think), required=True)
    reasoning = tok.encode("let me see", add_special_tokens=False)
    end_think = tok.encode("</think>\n", add_special_tokens=False)
    scores = torch.randn(1, len(tok), generator=torch.Generator().manual_seed(0))
    pick = lambda ids: int(guide(torch.tensor([ids]), scores.clone())[0].argmax())  # noqa: E731
    assert pick(think) == pick(think + reasoning) == int(scores[0].argmax())  # thinking is left alone
    assert pick(think + reasoning + end_think) == guide.open_id
    called = think + end_think + tok.encode('<tool_call>\n{"name": "dates", "arguments": {"start": "x"}}\n</tool_call>',
                                            add_special_tokens=False)
    assert pick(called) == int(scores[0].argmax())  # one call made: the rest is free
    named = ToolCallGuide(tok, SCHEMAS, 0, names=["units"])
    assert named.schema["properties"]["name"]["enum"] == ["units"]


def test_a_vocabulary_that_splits_the_tags_is_left_unguided(tmp_path):
    from small_tokenizers import minimind2_like, minimind3_like
    from trainer.tool_guide import can_guide
    old = load_tokenizer(minimind2_like(tmp_path / "m2"))
    assert not can_guide(old)  # eval_model.py and the server then decode calls unguided
    with pytest.raises(ValueError, match="no <tool_call>"):
        ToolCallGuide(old, SCHEMAS, 0)
    assert can_guide(load_tokenizer(minimind3_like(tmp_path / "m3")))


def test_json_reply_guide_ends_the_reply_only_after_a_whole_value(tok):
    from trainer.tool_guide import JsonReplyGuide
    guide = JsonReplyGuide(tok, {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}, 0)
    scores = torch.zeros(1, len(tok))
    scores[0, tok.eos_token_id] = 9.0
    scores[0, tok.convert_tokens_to_ids("}")] = 5.0
    scores[0, tok.convert_tokens_to_ids("{\"")] = 4.0
    pick = lambda text: tok.convert_ids_to_tokens(int(guide(torch.tensor([tok.encode(text, add_special_tokens=False)]),  # noqa: E731
                                                            scores.clone())[0].argmax()))
    assert pick(" ") == '{"'  # the reply must start an object, not end
    assert pick('{"n": 3') == "}"  # "}" closes it: the required key is there
    assert pick('{"n": 3}') == "<|im_end|>"


def test_a_pattern_ends_an_expression_where_the_question_s_words_would_run_on(tok):
    """The demo model's miss: `"839 + 41得` (the question was "839 + 41得多少？"). With the calculator's pattern the
    guide keeps the likeliest token that can still match, and the string can close; a token ending inside a
    character fits only if some character it can become matches."""
    prompt, ids = block_prefix(tok, '\n{"name": "calculator", "arguments": {"expression": "839 + 41')
    guide = ToolCallGuide(tok, SCHEMAS, len(prompt))
    scores = torch.zeros(1, len(tok))
    for piece, s in {"得": 9.0, "是": 8.0, "\"}}": 5.0, " *": 4.0}.items():
        tid = tok.encode(piece, add_special_tokens=False)
        assert len(tid) == 1, piece
        scores[0, tid[0]] = s
    out = guide(torch.tensor([ids]), scores)
    assert tok.decode([int(out[0].argmax())]) == '"}}'
    assert torch.isinf(out[0, tok.encode("得", add_special_tokens=False)[0]])
    from trainer.tool_guide import clean_schema
    unit = start_state(clean_schema({"type": "string", "pattern": "^[0-9]+(米|公里)$"}))
    assert feed(unit, "\"12".encode() + "公".encode()[:1]) is not None  # may still become 公
    assert feed(unit, "\"12".encode() + "得".encode()[:2]) is None  # 得's first bytes cannot become 米 or 公
    assert feed(unit, '"12公里"'.encode()) is not None and feed(unit, '"12公"'.encode()) is None
    assert clean_schema({"type": "string", "pattern": "(unclosed"}) == {"type": ["string"]}  # unreadable: not enforced


def test_json_reply_guide_keeps_a_pattern():
    from trainer.tool_guide import clean_schema
    schema = clean_schema({"type": "object", "properties": {"date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}}})
    assert verdict('{"date": "2026-11-29"}', schema) == "complete"
    assert verdict('{"date": "soon"}', schema) == "invalid"


def test_string_lengths_are_counted_in_characters():
    from trainer.tool_guide import clean_schema
    schema = clean_schema({"type": "object", "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 4},
        "code": {"type": "string", "pattern": "^[A-Z]+$", "maxLength": 3}}})
    for text, want in [('{"name": "ab"}', "complete"), ('{"name": "abcd"}', "complete"),
                       ('{"name": "计算机器"}', "complete"),  # four characters, twelve bytes
                       ('{"name": "a\\n\\u00e9b"}', "complete"),  # an escape sequence is one character
                       ('{"name": "a"}', "invalid"), ('{"name": "abcde', "invalid"), ('{"name": "计算机器人', "invalid"),
                       ('{"name": "abcd\\', "invalid"), ('{"code": "ABC"}', "complete"), ('{"code": "ABCD', "invalid"),
                       ('{"code": "AB1', "invalid")]:
        assert verdict(text, schema) == want, text
    # limits no string meets, or not lengths at all, are not enforced
    for limits in [{"minLength": 5, "maxLength": 2}, {"maxLength": -1}, {"maxLength": "3"}, {"maxLength": True}]:
        loose = clean_schema({"type": "object", "properties": {"s": {"type": "string", **limits}}})
        assert verdict('{"s": "a long string"}', loose) == "complete", limits


def test_after_max_calls_no_block_opens_and_no_stray_closing_tag_is_written(tok):
    prompt = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    call = tok.encode('<tool_call>\n{"name": "dates", "arguments": {"start": "2021-05-20"}}\n</tool_call>', add_special_tokens=False)
    open_id, close_id = (tok.convert_tokens_to_ids(t) for t in ("<tool_call>", "</tool_call>"))
    scores = torch.zeros(1, len(tok))
    for max_calls, ids, open_allowed in [(1, prompt, True), (1, prompt + call, False), (2, prompt + call, True)]:
        out = ToolCallGuide(tok, SCHEMAS, len(prompt), max_calls=max_calls)(torch.tensor([ids]), scores.clone())
        assert torch.isfinite(out[0, open_id]) == open_allowed and torch.isinf(out[0, close_id])
    # a block the prompt opened (an assistant prefix) may still be closed: the guide leaves that row alone
    prefilled = prompt + call[:-1]
    out = ToolCallGuide(tok, SCHEMAS, len(prefilled))(torch.tensor([prefilled]), scores.clone())
    assert torch.isfinite(out[0, close_id])
