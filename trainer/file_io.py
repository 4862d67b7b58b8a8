"""Reading and writing the files a run depends on: weight files and the config .json beside them, resume
files, LoRA adapters, tokenizer files.

Every failure is one UserError naming the file and the fix (empty, truncated, not JSON, wrong types, disk
full, no permission). A write goes to a temporary file in the target's folder, is flushed to disk and only
then renamed over the target, so a failed or interrupted save never damages the previous good file; a pair
of files that belong together (weights + config) is renamed only once both are complete.
"""
import errno
import json
import os

from trainer.cli import UserError, brief

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # the file system (or the user's quota) is full
NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)


def describe_os_error(e, path, writing=False):
    """One line for an OSError on `path`, with the fix."""
    if e.errno in NO_SPACE:
        return (f"{path}: no space left to write it ({e.strerror}); free some disk space or choose another --out_dir "
                f"(the previous file, if any, is unchanged)")
    if e.errno == errno.EFBIG:
        return (f"{path}: the file size limit was reached while writing it ({e.strerror}; see `ulimit -f`); raise the "
                f"limit or choose another --out_dir (the previous file, if any, is unchanged)")
    if e.errno in NO_PERMISSION:
        return f"{path}: cannot {'write' if writing else 'read'} it ({e.strerror}); check its permissions or choose another path"
    if e.errno == errno.ENOENT:
        return f"{path}: no such file or folder; check the path"
    if e.errno == errno.EISDIR:
        return f"{path} is a folder, not a file; point at the file inside it"
    if e.errno == errno.ENOTDIR:
        return f"{path}: a part of this path is a file, not a folder; check the path"
    return f"{path}: cannot {'write' if writing else 'read'} it ({e.strerror or brief(e)})"


def os_error_behind(exc):
    """The OSError that caused exc (torch.save, on a full disk, raises a RuntimeError while cleaning up after
    the write that failed), or None."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _tmp_path(path):
    return f"{path}.tmp{os.getpid()}"


def _write_tmp(path, write):
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so a crash cannot leave an empty file behind
    return tmp


def atomic_write_files(writers):
    """writers: {path: write(binary file object)}. Every file is written to a temporary file first; the
    targets are replaced only when all of them are complete. Raises UserError (nothing replaced) on failure."""
    written, current = [], None
    try:
        for path, write in writers.items():
            current = path
            written.append(_write_tmp(path, write))
        for path in writers:
            current = path
            os.replace(_tmp_path(path), path)
    except Exception as e:  # noqa: BLE001 - torch.save can hide the OSError behind its own RuntimeError
        cause = os_error_behind(e)
        if cause is None:
            raise
        raise UserError(describe_os_error(cause, current, writing=True)) from None
    finally:
        for tmp in written + [_tmp_path(p) for p in writers]:
            if os.path.exists(tmp):
                try:
                    os.remove(tmp)
                except OSError:
                    pass


def atomic_torch_save(obj, path):
    import torch
    atomic_write_files({path: lambda f: torch.save(obj, f)})


def atomic_write_text(text, path):
    atomic_write_files({path: lambda f: f.write(text.encode("utf-8"))})


def check_readable(path, what, fix):
    """A file that exists, is a file and is not empty; else one line saying so."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: {fix}")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a {what}; {fix}")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path} is empty (0 bytes), not a {what}: an interrupted copy or save? {fix}")


def read_torch_file(path, what, fix):
    """torch.load(path, weights_only=True) on the CPU; any failure is one line naming the file, `what` it
    should be and the `fix`."""
    import torch
    check_readable(path, what, fix)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        if e.errno in NO_PERMISSION + (errno.ENOENT, errno.EISDIR, errno.EIO):  # the file cannot be opened or read
            raise UserError(describe_os_error(e, path)) from None
        raise UserError(f"{path}: not a readable {what}, truncated or not written by torch.save ({brief(e, 100)}); {fix}") from None
    except Exception as e:  # noqa: BLE001 - a truncated zip, a foreign pickle, random bytes: all the same problem
        raise UserError(f"{path}: not a readable {what}, truncated or not written by torch.save "
                        f"({brief(e, 100)}); {fix}") from None


def read_json_file(path, what, fix):
    """A JSON object from a UTF-8 file; any failure is one line naming the file and the fix."""
    check_readable(path, what, fix)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as e:
        raise UserError(describe_os_error(e, path)) from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}), not a {what}; {fix}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg.removesuffix(' at')} at line {e.lineno} column {e.colno}), "
                        f"not a {what}; {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: a JSON {type(obj).__name__}, not a {what} (a JSON object); {fix}")
    return obj
