"""trainer/tools.py: the calculator refuses anything but arithmetic, the units and date tools, schemas,
parsing the model's <tool_call> blocks, and the runner's error texts."""
import json
import time

import pytest

from conftest import ROOT  # noqa: F401  (puts the repository on sys.path)
from trainer import tools as T


@pytest.mark.parametrize("expression,result", [
    ("1+2*3", "7"), ("(3 + 4) * 5", "35"), ("7/2", "3.5"), ("0.1+0.2", "0.3"), ("10 // 3", "3"), ("10 % 4", "2"),
    ("2**10", "1024"), ("-3 - -4", "1"), ("3×4÷2", "6"), ("2^8", "256"), ("1/3", "0.3333333333"), ("1.5e3 + 1", "1501"),
])
def test_calculator_does_arithmetic(expression, result):
    assert T.calculator(expression) == result


@pytest.mark.parametrize("expression,why", [
    ("__import__('os').system('ls')", "not function calls"), ("abs(-1)", "not function calls"),
    ("x + 1", "not names"), ("(1).real", "not attributes"), ("'a' * 3", "not Constant"), ("[1, 2]", "not List"),
    ("2 ** 100000", "exponent 100000 is too large"), ("9 ** 64 * 9 ** 64", "too large"), ("1e300 * 10", "too large"),
    ("1 / 0", "division by zero"), ("(-8) ** 0.5", "not a real number"), ("1 +", "not an arithmetic expression"),
    ("1 if 1 else 2", "not IfExp"), ("lambda: 1", "not Lambda"), ("1" * 201, "longer than 200"),
    ("True + 1", "not Constant"),
])
def test_calculator_refuses_everything_but_bounded_arithmetic(expression, why):
    with pytest.raises(T.ToolError, match=why):
        T.calculator(expression)


def test_units_and_dates():
    assert T.units(5, **{"from": "km", "to": "mi"}) == "3.10686"
    assert T.units(100, **{"from": "C", "to": "F"}) == "212"
    assert T.units(32, **{"from": "°F", "to": "摄氏度"}) == "0"
    assert T.units(3, **{"from": "斤", "to": "g"}) == "1500"
    assert T.units(90, **{"from": "min", "to": "h"}) == "1.5"
    with pytest.raises(T.ToolError, match=r"cannot convert mass \(kg\) to length \(km\)"):
        T.units(1, **{"from": "kg", "to": "km"})
    with pytest.raises(T.ToolError, match="unknown unit 'parsec'"):
        T.units(1, **{"from": "parsec", "to": "km"})
    assert T.dates("2024-03-01") == "Friday"
    assert T.dates("2024-02-28", days=2) == "2024-03-01 Friday"  # a leap year
    assert T.dates("2024-03-01", days=-1) == "2024-02-29 Thursday"
    assert T.dates("2024-01-01", end="2024-12-25") == "359 days"
    with pytest.raises(T.ToolError, match="YYYY-MM-DD"):
        T.dates("March 1")
    with pytest.raises(T.ToolError, match="either days or end"):
        T.dates("2024-01-01", days=1, end="2024-01-03")


def test_schemas_are_openai_function_tools_and_select_tools():
    for tool in T.TOOLS.values():
        s = tool.schema
        assert s["type"] == "function" and s["function"]["name"] == tool.name
        assert s["function"]["parameters"]["type"] == "object"
        assert set(s["function"]["parameters"]["required"]) <= set(s["function"]["parameters"]["properties"])
        json.dumps(s)
    assert list(T.select_tools("all")) == ["calculator", "units", "dates"]
    assert list(T.select_tools("dates, calculator")) == ["dates", "calculator"]
    with pytest.raises(T.ToolError, match="unknown tool.*weather.*choose from calculator, units, dates or all"):
        T.select_tools("calculator,weather")


def test_parse_tool_calls():
    text = ('Let me check.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>\n'
            '<tool_call>\nnot json\n</tool_call><tool_call>\n{"name": "dates", "arguments": {"start": "2024-01-01"}')
    content, calls = T.parse_tool_calls(text)
    assert content == "Let me check."
    assert calls == [{"name": "calculator", "arguments": {"expression": "1+1"}}, "not json",
                     '{"name": "dates", "arguments": {"start": "2024-01-01"}']
    assert T.parse_tool_calls("no calls here") == ("no calls here", [])


@pytest.mark.parametrize("call,expected", [
    ({"name": "calculator", "arguments": {"expression": "6*7"}}, "42"),
    ({"name": "calculator", "arguments": '{"expression": "6*7"}'}, "42"),  # OpenAI's JSON-string arguments
    ("not json", "error: the tool call is not a JSON object with name and arguments: 'not json'"),
    ({"name": "weather", "arguments": {}}, "error: unknown tool 'weather'; available: calculator, units, dates"),
    ({"name": "calculator", "arguments": "{oops"}, "error: arguments of calculator are not valid JSON: '{oops'"),
    ({"name": "calculator", "arguments": {}}, "error: calculator needs argument(s) expression"),
    ({"name": "calculator", "arguments": {"expression": "1", "x": 2}}, "error: calculator has no argument 'x'; its arguments: expression"),
    ({"name": "units", "arguments": {"value": "5", "from": "km", "to": "m"}}, 'error: argument \'value\' of units must be a JSON number, got "5"'),
    ({"name": "dates", "arguments": {"start": "2024-01-01", "days": 1.5}}, "error: argument 'days' of dates must be a JSON integer, got 1.5"),
    ({"name": "calculator", "arguments": {"expression": "1/0"}}, "error: division by zero"),
    # a string's schema keywords, as the guided decoding keeps to them (a free model's call can break them)
    ({"name": "calculator", "arguments": {"expression": "839 + 41得"}},
     'error: argument \'expression\' of calculator must match the pattern ^[0-9.+\\-*/%() ]+$, got "839 + 41得"'),
    ({"name": "dates", "arguments": {"start": "20240101"}},  # Python's fromisoformat would take it
     'error: argument \'start\' of dates must match the pattern ^\\d{4}-\\d{2}-\\d{2}$, got "20240101"'),
    ({"name": "calculator", "arguments": ["1+1"]}, "error: arguments of calculator must be a JSON object, got list"),
])
def test_runner_returns_results_or_clear_error_texts(call, expected):
    assert T.run_tool_call(call, T.TOOLS) == expected


def test_runner_checks_enum_and_length_keywords():
    echo = T.Tool("echo", "says a word back", {"type": "object", "required": ["word"], "properties": {
        "word": {"type": "string", "enum": ["yes", "no"]}, "note": {"type": "string", "minLength": 2, "maxLength": 4}}},
        lambda word, note="": word + note)
    tools = {"echo": echo}
    assert T.run_tool_call({"name": "echo", "arguments": {"word": "yes", "note": "ok"}}, tools) == "yesok"
    assert T.run_tool_call({"name": "echo", "arguments": {"word": "maybe"}}, tools) == \
        'error: argument \'word\' of echo must be one of "yes", "no", got "maybe"'
    assert T.run_tool_call({"name": "echo", "arguments": {"word": "no", "note": "x"}}, tools) == \
        'error: argument \'note\' of echo must be at least 2 characters long, got "x"'
    assert T.run_tool_call({"name": "echo", "arguments": {"word": "no", "note": "abcde"}}, tools) == \
        'error: argument \'note\' of echo must be at most 4 characters long, got "abcde"'


def test_runner_time_limit():
    slow = T.Tool("slow", "sleeps", {"type": "object", "properties": {}, "required": []}, lambda: time.sleep(2) or "late")
    # the runner answers with the time-out text, not with the tool's late "late"
    assert T.run_tool_call({"name": "slow", "arguments": {}}, {"slow": slow}, timeout=0.2) == "error: the tool took longer than 0.2 s"
