"""One chat turn with tools: generate a reply, run the tool calls it makes, feed the results back, generate
again, until the model answers without a call. eval_model.py --tools and the server's page mode
(serve_openai_api.py --tools) both answer through `chat_turn`.

    for event, value in chat_turn(generate, messages, select_tools("all"), thinking=None):
        ...   # ("reply_start", None) ("text", piece) ("reply", assistant message) ("tool_result", tool message) ("round_limit", n)

`generate(messages)` yields the text pieces of the model's reply to `messages` (already rendered with the
tools by the caller's prompt builder). `messages` is extended in place with OpenAI-shaped messages:
the assistant's reply ({"role": "assistant", "content", "reasoning_content"?, "tool_calls"?}) and one
{"role": "tool", "tool_call_id", "name", "content"} per call, so the same list renders the next prompt
through the chat template and can be sent to any OpenAI-compatible server.
"""
import json
import uuid

from trainer.tools import ToolError, parse_tool_calls, run_tool_call, select_tools
from trainer_utils import UserError, add_bool

THINK, END_THINK = "<think>", "</think>"
# What the chat template's generation prompt pre-fills for enable_thinking true / false (None: nothing).
THINK_PREFILL = {True: "<think>\n", False: "<think>\n\n</think>\n", None: ""}


def add_tool_args(parser, what_they_do):
    """--tools and --max_tool_rounds, as eval_model.py and the server take them."""
    g = parser.add_argument_group("tools")
    g.add_argument("--tools", default=None, metavar="calculator,units,dates|all",
                   help=f"tools from trainer/tools.py {what_they_do} (default: none)")
    g.add_argument("--max_tool_rounds", type=int, default=4,
                   help="the most times the model is given tool results and asked again per message (default 4)")
    add_bool(g, "--guided_tool_calls", default=True,
             help="inside a <tool_call> block let the model write only a well-formed call to an offered tool, with "
                  "arguments its schema allows (trainer/tool_guide.py; default 1; 0: leave the model free; the server "
                  "also needs it for tool_choice required or named, parallel_tool_calls false and JSON replies)")


def tools_from_args(args):
    """--tools as {name: Tool} ({} without it); a bad value is one clear UserError."""
    if args.max_tool_rounds < 0:
        raise UserError("--max_tool_rounds must be 0 or more")
    try:
        return select_tools(args.tools) if args.tools else {}
    except ToolError as e:
        raise UserError(f"--tools: {e}") from None


def new_call_id():
    return f"call_{uuid.uuid4().hex[:24]}"


def is_well_formed_call(call):
    """A parsed <tool_call> block that names a function: {"name": str, "arguments": object (or a JSON string)}."""
    return (isinstance(call, dict) and isinstance(call.get("name"), str) and call["name"] != ""
            and isinstance(call.get("arguments", {}), (dict, str)))


def openai_tool_call(call, call_id=None):
    """A call as parse_tool_calls returns it -> OpenAI's {"id", "type": "function", "function": {"name",
    "arguments": a JSON string}}. A block that was not a well-formed call keeps its raw text as arguments
    (and the name it gave, if any), so the runner's error answer still pairs with it."""
    if is_well_formed_call(call):
        name, args = call["name"], call.get("arguments", {})
        arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    elif isinstance(call, dict) and isinstance(call.get("name"), str) and call["name"]:  # arguments not an object
        name, arguments = call["name"], json.dumps(call.get("arguments"), ensure_ascii=False)
    else:  # not JSON, or no name: the runner answers with an error about the whole block
        name, arguments = "", call if isinstance(call, str) else json.dumps(call, ensure_ascii=False)
    return {"id": call_id or new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def assistant_message(text):
    """The model's whole reply (with what the prompt pre-filled) -> an OpenAI-shaped assistant message:
    the think part as reasoning_content, <tool_call> blocks as tool_calls (fresh ids), the rest as content."""
    message = {"role": "assistant"}
    head = text.lstrip()
    if head.startswith(THINK):
        reasoning, _, text = head[len(THINK):].partition(END_THINK)
        message["reasoning_content"] = reasoning.strip("\n")  # the template writes <think>\n...\n</think>\n
        text = text.lstrip("\n")
    content, calls = parse_tool_calls(text)
    message["content"] = content
    if calls:
        message["tool_calls"] = [openai_tool_call(call) for call in calls]
    return message


def run_calls(message, tools, timeout=5.0):
    """The tool messages answering an assistant message's tool_calls, in order."""
    results = []
    for call in message.get("tool_calls", []):
        fn = call["function"]
        parsed = {"name": fn["name"], "arguments": fn["arguments"]} if fn["name"] else fn["arguments"]
        results.append({"role": "tool", "tool_call_id": call["id"], "name": fn["name"],
                        "content": run_tool_call(parsed, tools, timeout)})
    return results


def chat_turn(generate, messages, tools, thinking=None, max_rounds=4, timeout=5.0):
    """Answer the last user message, running the model's tool calls. Every call is run and answered (so
    `messages` stays a well-formed conversation); the model reads the results and replies again at most
    `max_rounds` times, after which the caller sees ("round_limit", max_rounds). `thinking` is the
    enable_thinking the prompts are rendered with: its pre-filled text is part of each reply. Yields
    (event, value) pairs, see the module docstring."""
    for round_ in range(max_rounds + 1):
        yield "reply_start", None
        pieces = []
        for piece in generate(messages):
            pieces.append(piece)
            yield "text", piece
        message = assistant_message(THINK_PREFILL[thinking] + "".join(pieces))
        messages.append(message)
        yield "reply", message
        if "tool_calls" not in message:
            return
        for result in run_calls(message, tools, timeout):
            messages.append(result)
            yield "tool_result", result
    yield "round_limit", max_rounds
