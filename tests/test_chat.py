"""trainer/chat.py: the generate -> run calls -> feed results back -> generate loop shared by eval_model.py
--tools and the server's page mode, driven here by scripted replies (the real model drives it in
test_eval_model.py and test_serve.py)."""
import json

from conftest import ROOT  # noqa: F401  (puts the repository on sys.path)
from trainer.chat import assistant_message, chat_turn
from trainer.tools import select_tools

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>'


def scripted(*replies):
    """generate(messages) that answers with the given texts in turn, one piece per character, and records
    the messages it was asked with."""
    asked = []

    def generate(messages):
        asked.append([dict(m) for m in messages])
        yield from replies[len(asked) - 1]
    return generate, asked


def test_assistant_message_splits_think_content_and_calls():
    m = assistant_message("<think>\nfirst multiply\n</think>\nLet me compute.\n" + CALL)
    assert m["reasoning_content"] == "first multiply" and m["content"] == "Let me compute."
    [call] = m["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "calculator", "arguments": '{"expression": "12*7"}'}
    assert assistant_message("plain") == {"role": "assistant", "content": "plain"}


def test_a_call_is_run_and_its_result_fed_back_until_the_model_answers():
    generate, asked = scripted(CALL, "12*7 = 84.")
    messages = [{"role": "user", "content": "What is 12*7?"}]
    events = list(chat_turn(generate, messages, select_tools("calculator")))
    assert [e for e, _ in events if e != "text"] == ["reply_start", "reply", "tool_result", "reply_start", "reply"]
    assert "".join(v for e, v in events if e == "text") == CALL + "12*7 = 84."
    call_id = messages[1]["tool_calls"][0]["id"]
    assert messages[1:] == [
        {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": {
            "name": "calculator", "arguments": '{"expression": "12*7"}'}}]},
        {"role": "tool", "tool_call_id": call_id, "name": "calculator", "content": "84"},
        {"role": "assistant", "content": "12*7 = 84."},
    ]
    assert asked[1] == messages[:3]  # the second reply was asked with the call and its result


def test_bad_calls_get_error_results_that_pair_with_them():
    generate, _ = scripted("<tool_call>\nnot json\n</tool_call>\n" + CALL.replace("calculator", "weather"), "sorry")
    messages = [{"role": "user", "content": "?"}]
    list(chat_turn(generate, messages, select_tools("calculator")))
    calls, results = messages[1]["tool_calls"], messages[2:4]
    assert [r["tool_call_id"] for r in results] == [c["id"] for c in calls]
    assert results[0]["content"].startswith("error: the tool call is not a JSON object")
    assert results[1]["content"] == "error: unknown tool 'weather'; available: calculator"
    assert messages[4] == {"role": "assistant", "content": "sorry"}


def test_round_limit_runs_the_last_calls_and_stops():
    generate, asked = scripted(CALL, CALL, CALL, "never asked")
    messages = [{"role": "user", "content": "?"}]
    events = list(chat_turn(generate, messages, select_tools("calculator"), max_rounds=2))
    assert events[-1] == ("round_limit", 2)
    assert len(asked) == 3  # the first reply and 2 more after results
    assert [m["role"] for m in messages] == ["user"] + ["assistant", "tool"] * 3  # every call answered


def test_thinking_prefill_is_part_of_the_reply():
    generate, _ = scripted("weigh it\n</think>\nanswer")
    messages = [{"role": "user", "content": "?"}]
    list(chat_turn(generate, messages, {}, thinking=True))
    assert messages[1] == {"role": "assistant", "reasoning_content": "weigh it", "content": "answer"}
    generate, _ = scripted("direct answer")
    messages = [{"role": "user", "content": "?"}]
    list(chat_turn(generate, messages, {}, thinking=False))
    assert messages[1] == {"role": "assistant", "reasoning_content": "", "content": "direct answer"}


def test_messages_render_back_as_the_model_wrote_them():
    """The loop's messages go through the chat template into the next prompt: the call renders as written."""
    from dataset.lm_dataset import load_tokenizer, render_chat
    tok = load_tokenizer()
    generate, _ = scripted(CALL, "done")
    messages = [{"role": "user", "content": "What is 12*7?"}]
    list(chat_turn(generate, messages, select_tools("calculator")))
    text = render_chat(tok, messages, [select_tools("calculator")["calculator"].schema])
    assert "<|im_start|>assistant\n" + CALL + "<|im_end|>\n<|im_start|>user\n<tool_response>\n84\n</tool_response><|im_end|>\n" in text
    assert json.loads(messages[1]["tool_calls"][0]["function"]["arguments"]) == {"expression": "12*7"}
