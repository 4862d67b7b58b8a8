"""Tools a chat model can call, and the runner that executes its calls.

    from trainer.tools import select_tools, parse_tool_calls, run_tool_call
    tools = select_tools("calculator,units,dates")       # or "all"
    schemas = [t.schema for t in tools.values()]       # -> apply_chat_template(..., tools=schemas)
    content, calls = parse_tool_calls(reply_text)      # the model's <tool_call> blocks
    result = run_tool_call(calls[0], tools)            # the text the model reads back in <tool_response>

Three deterministic tools, each a small function with its OpenAI function schema:
- calculator: arithmetic on numbers (+ - * / // % ** and parentheses), evaluated by walking Python's AST:
  never eval(), no names, no attributes, no calls, bounded exponents and sizes;
- units: converts a value between units of length, mass, volume, time or temperature;
- dates: weekday of a date, a date plus some days, or the days between two dates.
A call the runner cannot execute (bad JSON, unknown tool, wrong or missing arguments, a tool error, a
time-out) returns an `error: ...` text that the model reads, never an exception.
"""
import ast
import datetime
import json
import math
import operator
import re
import threading
from dataclasses import dataclass
from typing import Callable

from trainer.tool_guide import clean_schema


class ToolError(ValueError):
    """A call a tool refuses; its message goes back to the model as `error: ...`."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    run: Callable[..., str]

    @property
    def schema(self):
        """OpenAI's function-tool shape, as `tools` in a chat request or in training data."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def format_number(x):
    """12.0 -> "12", 0.1 + 0.2 -> "0.3": at most 10 significant digits, no trailing zeros."""
    if isinstance(x, bool):
        raise ToolError("not a number")
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        raise ToolError("the result is not a finite number")
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.10g}"


# ----------------------------------------------------------------------------------------------------
# calculator
# ----------------------------------------------------------------------------------------------------
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64
MAX_MAGNITUDE = 1e30
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _evaluate(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        if abs(node.value) > MAX_MAGNITUDE:
            raise ToolError("a number in the expression is too large")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponent {format_number(right)} is too large (at most {MAX_EXPONENT})")
        try:
            value = BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        if isinstance(value, complex):
            raise ToolError("the result is not a real number")
        if abs(value) > MAX_MAGNITUDE:
            raise ToolError("the result is too large")
        return value
    what = {ast.Name: "names", ast.Attribute: "attributes", ast.Call: "function calls"}.get(type(node), type(node).__name__)
    raise ToolError(f"only numbers and + - * / // % ** ( ) are allowed, not {what}")


def calculator(expression):
    text = str(expression).strip().replace("×", "*").replace("÷", "/").replace("^", "**")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {text!r}") from None
    return format_number(_evaluate(tree.body))


# ----------------------------------------------------------------------------------------------------
# units: every unit is (kind, size in the kind's base unit); temperatures are converted through kelvin
# ----------------------------------------------------------------------------------------------------
UNITS = {
    "m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01), "mm": ("length", 0.001),
    "mi": ("length", 1609.344), "yd": ("length", 0.9144), "ft": ("length", 0.3048), "in": ("length", 0.0254),
    "kg": ("mass", 1.0), "g": ("mass", 0.001), "t": ("mass", 1000.0), "lb": ("mass", 0.45359237),
    "oz": ("mass", 0.028349523125), "jin": ("mass", 0.5),
    "l": ("volume", 1.0), "ml": ("volume", 0.001), "gal": ("volume", 3.785411784),
    "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0), "day": ("time", 86400.0), "week": ("time", 604800.0),
    "c": ("temperature", None), "f": ("temperature", None), "k": ("temperature", None),
}
UNIT_ALIASES = {"L": "l", "mL": "ml", "C": "c", "F": "f", "K": "k", "°C": "c", "°F": "f", "斤": "jin",
                "公里": "km", "千米": "km", "米": "m", "厘米": "cm", "毫米": "mm", "英里": "mi", "英尺": "ft", "英寸": "in",
                "码": "yd", "千克": "kg", "公斤": "kg", "克": "g", "吨": "t", "磅": "lb", "盎司": "oz", "升": "l", "毫升": "ml",
                "加仑": "gal", "秒": "s", "分钟": "min", "小时": "h", "天": "day", "周": "week", "摄氏度": "c", "华氏度": "f",
                "开尔文": "k"}
UNIT_NAMES = sorted(UNITS, key=lambda u: (UNITS[u][0], u))


def _unit(name, which):
    key = UNIT_ALIASES.get(str(name).strip(), str(name).strip().lower())
    if key not in UNITS:
        raise ToolError(f"unknown unit {name!r} for {which!r}; known: {', '.join(UNIT_NAMES)}")
    return key


def _to_kelvin(value, unit):
    return {"c": value + 273.15, "f": (value - 32) * 5 / 9 + 273.15, "k": value}[unit]


def _from_kelvin(value, unit):
    return {"c": value - 273.15, "f": (value - 273.15) * 9 / 5 + 32, "k": value}[unit]


def units(value, **kw):
    source, target = _unit(kw["from"], "from"), _unit(kw["to"], "to")
    (kind_a, size_a), (kind_b, size_b) = UNITS[source], UNITS[target]
    if kind_a != kind_b:
        raise ToolError(f"cannot convert {kind_a} ({kw['from']}) to {kind_b} ({kw['to']})")
    if kind_a == "temperature":
        result = _from_kelvin(_to_kelvin(value, source), target)
    else:
        result = value * size_a / size_b
    return format_number(float(f"{result:.6g}"))  # 6 significant digits


# ----------------------------------------------------------------------------------------------------
# dates
# ----------------------------------------------------------------------------------------------------
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _date(text, which):
    try:
        return datetime.date.fromisoformat(str(text).strip())
    except ValueError:
        raise ToolError(f"{which} must be a date written YYYY-MM-DD, got {text!r}") from None


def dates(start, days=None, end=None):
    first = _date(start, "start")
    if days is not None and end is not None:
        raise ToolError("give either days or end, not both")
    if end is not None:
        return f"{(_date(end, 'end') - first).days} days"
    if days is not None:
        if abs(days) > 1_000_000:
            raise ToolError("days must be at most 1000000")
        try:
            day = first + datetime.timedelta(days=days)
        except OverflowError:
            raise ToolError("the date is out of range") from None
        return f"{day.isoformat()} {WEEKDAYS[day.weekday()]}"
    return WEEKDAYS[first.weekday()]


# ----------------------------------------------------------------------------------------------------
# The tool table, and the runner
# ----------------------------------------------------------------------------------------------------
def _object(properties, required):
    return {"type": "object", "properties": properties, "required": required}


# Patterns (JSON Schema's `pattern`) tell a model what the strings look like, and let schema-guided decoding
# (trainer/tool_guide.py) keep a call's strings to them: an expression that runs on into the question's words,
# `"839 + 41得"`, closes at `"839 + 41"` instead.
EXPRESSION_PATTERN = r"^[0-9.+\-*/%() ]+$"
DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"
TOOLS = {t.name: t for t in [  # short descriptions: every schema token is in the prompt of every tool request
    Tool("calculator", "Arithmetic: + - * / // % ** ( )",
         _object({"expression": {"type": "string", "pattern": EXPRESSION_PATTERN}}, ["expression"]), calculator),
    Tool("units", "Convert a value between units, e.g. km to mi",
         _object({"value": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}}, ["value", "from", "to"]), units),
    Tool("dates", "Weekday of a date (YYYY-MM-DD), the date some days later, or the days until an end date",
         _object({"start": {"type": "string", "pattern": DATE_PATTERN}, "days": {"type": "integer"},
                  "end": {"type": "string", "pattern": DATE_PATTERN}}, ["start"]), dates),
]}


def select_tools(spec):
    """"calculator,units" or "all" -> {name: Tool}; an unknown name is a ToolError naming the known ones."""
    names = list(TOOLS) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in TOOLS]
    if unknown or not names:
        raise ToolError(f"unknown tool(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(TOOLS)} or all")
    return {n: TOOLS[n] for n in names}


TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def parse_tool_calls(text):
    """A reply's text -> (the text outside <tool_call> blocks, [each block's parsed JSON object, or its raw
    text when it is not a JSON object]). An unclosed last block counts as a call too."""
    calls = []
    for body in TOOL_CALL_RE.findall(text):
        calls.append(_parse_call_body(body))
    rest = TOOL_CALL_RE.sub("", text)
    if "<tool_call>" in rest:  # cut off by the length limit, or the model forgot to close it
        rest, body = rest.split("<tool_call>", 1)
        calls.append(_parse_call_body(body))
    return rest.strip(), calls


def _parse_call_body(body):
    try:
        obj = json.loads(body.strip())
    except json.JSONDecodeError:
        return body.strip()
    return obj if isinstance(obj, dict) else body.strip()


_TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "object": dict, "array": list}


def check_arguments(tool, args):
    """The arguments object against the tool's schema: required present, no unknown names, JSON types, and for
    strings the keywords schema-guided decoding keeps to (trainer/tool_guide.py): `enum`, `pattern` (searched,
    as JSON Schema says), `minLength` and `maxLength`. A free (unguided) model's call breaking one gets the
    schema's own words back, not whatever the tool makes of the string."""
    if not isinstance(args, dict):
        raise ToolError(f"arguments of {tool.name} must be a JSON object, got {type(args).__name__}")
    props, required = tool.parameters["properties"], tool.parameters.get("required", [])
    missing = [k for k in required if k not in args]
    if missing:
        raise ToolError(f"{tool.name} needs argument(s) {', '.join(missing)}")
    for k, v in args.items():
        if k not in props:
            raise ToolError(f"{tool.name} has no argument {k!r}; its arguments: {', '.join(props)}")
        want = props[k]["type"]
        if not isinstance(v, _TYPES[want]) or (want in ("number", "integer") and isinstance(v, bool)):
            raise ToolError(f"argument {k!r} of {tool.name} must be a JSON {want}, got {json.dumps(v, ensure_ascii=False)}")
        if isinstance(v, str):
            problem = _string_problem(props[k], v)
            if problem:
                raise ToolError(f"argument {k!r} of {tool.name} {problem}, got {json.dumps(v, ensure_ascii=False)}")


def _string_problem(schema, value):
    rules = clean_schema(schema) or {}  # the guide's reading of the schema, so both enforce the same keywords
    enum, pattern = rules.get("enum"), rules.get("pattern")
    if enum is not None and value not in enum:
        return "must be one of " + ", ".join(json.dumps(e, ensure_ascii=False) for e in enum)
    if pattern is not None and pattern.search(value) is None:
        return f"must match the pattern {pattern.pattern}"
    if len(value) < rules.get("minLength", 0):
        return f"must be at least {rules['minLength']} characters long"
    if "maxLength" in rules and len(value) > rules["maxLength"]:
        return f"must be at most {rules['maxLength']} characters long"
    return None


def run_tool_call(call, tools, timeout=5.0):
    """Execute one call ({"name", "arguments"} as parsed, or the raw text of a block that was not JSON).
    Returns the text the model reads back: the tool's result, or `error: ...`."""
    try:
        if not isinstance(call, dict):
            raise ToolError(f"the tool call is not a JSON object with name and arguments: {str(call)[:80]!r}")
        name, args = call.get("name"), call.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise ToolError(f"arguments of {name} are not valid JSON: {args[:80]!r}") from None
        if name not in tools:
            raise ToolError(f"unknown tool {name!r}; available: {', '.join(tools)}")
        tool = tools[name]
        check_arguments(tool, args)
        return _run_with_timeout(tool.run, args, timeout)
    except ToolError as e:
        return f"error: {e}"


def _run_with_timeout(fn, args, timeout):
    """Run a tool in a daemon thread; past the time limit the caller gets an error text (the tools are
    pure functions with bounded inputs, so a straggler thread only burns its own CPU until it returns)."""
    box = {}

    def target():
        try:
            box["result"] = fn(**args)
        except ToolError as e:
            box["error"] = str(e)
        except (ValueError, TypeError, OverflowError, ArithmeticError) as e:
            box["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ToolError(f"the tool took longer than {timeout:g} s")
    if "error" in box:
        raise ToolError(box["error"])
    return box["result"]
