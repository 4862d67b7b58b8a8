"""How every script talks to its user: flags checked where they are parsed, and a user's mistake ended as
one `error: ...` line with exit status 1, never a traceback.

    parser = ArgumentParser(description=...)              # a bad flag: one line, exit 1 (not usage + exit 2)
    parser.add_argument("--batch_size", type=positive_int)   # 0 or -1 is refused while parsing
    parser.add_argument("--top_p", type=float_in(0, 1, lo_open=True))
    ...
    if __name__ == "__main__":
        run_main(main)                                   # UserError (and its subclasses) -> `error: ...`, exit 1

Under torchrun every rank runs the same code, so a mistake is usually seen by every rank at once: only rank
0 prints it, and every rank exits with status 1. Raise a UserError only where all ranks raise it together;
work done by rank 0 alone (saving, for instance) goes through `Context.on_master` in trainer_utils, which
hands rank 0's error to every rank. This module imports no torch, so light scripts stay fast to start.
"""
import argparse
import math
import os
import sys


class UserError(Exception):
    """A mistake the user can fix (missing file, wrong flag, bad data): printed as one line, exit 1.
    DataFormatError, LoRAError and CorpusError derive from it."""


def brief(exc, limit=160):
    """An exception as a short one-line phrase, for messages that wrap a library's error."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit]}" if text else type(exc).__name__


def is_first_rank():
    """True in a plain run and on rank 0 under torchrun (which sets RANK for every process)."""
    return os.environ.get("RANK", "0") == "0"


def print_error(message):
    if is_first_rank():
        print(f"error: {message}", file=sys.stderr, flush=True)


def user_error_message(exc):
    """The one line for an exception that is the user's to fix, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, FileNotFoundError) and exc.filename is None:  # raised with its own message ("x: data file not found")
        return str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:  # a file the user named is missing or unusable
        from trainer.file_io import describe_os_error
        return describe_os_error(exc, exc.filename)
    return None


def run_main(main):
    """Run a script's main(). A user's mistake becomes one `error: ...` line on stderr (rank 0 only under
    torchrun) and exit status 1 on every rank; Ctrl-C exits 130. Anything else is a bug: its traceback stays."""
    code = 0
    try:
        main()
    except KeyboardInterrupt:
        if is_first_rank():
            print("interrupted", file=sys.stderr, flush=True)
        code = 130
    except Exception as e:  # noqa: BLE001 - sorted into the user's mistakes and bugs right here
        message = user_error_message(e)
        if message is None:
            raise
        print_error(message)
        code = 1
    finally:
        dist = sys.modules.get("torch.distributed")  # only a script that imported torch can have a process group
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if code:
        sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one `error: ...` line and exit status 1, like every other mistake
    (argparse's own: the usage block and status 2, printed by every torchrun rank)."""

    def error(self, message):
        print_error(f"{message} (see {self.prog} --help)")
        sys.exit(1)


# ----------------------------------------------------------------------------------------------------
# Flag types: `type=` callables that refuse a value outside its range while parsing, with a message that
# says what the flag accepts. Floats must be finite: "nan" and "inf" are never a meaningful setting.
# ----------------------------------------------------------------------------------------------------
def _number(text, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _in_range(kind, lo, hi, lo_open, hi_open):
    def parse(text):
        value = _number(text, kind)
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {_describe_range(kind, lo, hi, lo_open, hi_open)}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some of its own messages
    return parse


def _describe_range(kind, lo, hi, lo_open, hi_open):
    if kind is int:
        if hi is None:
            return "a positive integer" if lo == 1 else f"an integer >= {lo}"
        return f"an integer <= {hi}" if lo is None else f"an integer from {lo} to {hi}"
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def int_in(lo=None, hi=None):
    """An integer with lo <= value <= hi (either bound may be None: unbounded)."""
    return _in_range(int, lo, hi, False, False)


def float_in(lo=None, hi=None, lo_open=False, hi_open=False):
    """A finite number in the range [lo, hi]; lo_open / hi_open exclude that end."""
    return _in_range(float, lo, hi, lo_open, hi_open)


positive_int = int_in(1)
nonneg_int = int_in(0)
positive_float = float_in(0, lo_open=True)
nonneg_float = float_in(0)
seed_int = int_in(0, 2**32 - 1)  # what numpy, Python's random and torch all take
port_int = int_in(1, 65535)


def plain_name(text):
    """A name that becomes part of a file name (--save_weight, --lora_name): no folder parts."""
    if not text or text in (".", "..") or "/" in text or os.sep in text or "\0" in text:
        raise argparse.ArgumentTypeError(f"must be a plain name without folders, got {text!r} (use --out_dir for the folder)")
    return text


def device_name(text):
    """cpu, cuda, cuda:N, mps ...: anything torch.device accepts (whether it is present is checked later)."""
    import torch
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda or cuda:N)") from None
    return text


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if v.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0, true/false), got {v!r}")


def add_bool(group, *names, default=False, help=""):
    group.add_argument(*names, type=str2bool, nargs="?", const=True, default=default, metavar="0|1", help=help)
