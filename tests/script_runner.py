"""Run the project's scripts many times without paying for `import torch, transformers` each time.

A server process (this file, started once) imports the heavy libraries and the project's modules, then for
every request forks a fresh child that runs the script file as __main__ with the requested argv, working
directory, stdin file, environment (added to the server's, or with replace_env the whole of it) and
(optionally) a file size limit. The child's stdout, stderr and exit
status are the real ones of that run; an exception nobody catches prints its traceback and exits 1, exactly
as `python script.py` does. The server itself never runs any model code, so the children start clean.

    runner = WarmRunner()
    result = runner.run("train_pretrain.py", ["--batch_size", "0"], cwd=ROOT)   # -> Result(returncode, stdout, stderr)
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections import namedtuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Result = namedtuple("Result", "returncode stdout stderr")
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
       "PYTHONPATH": ROOT, "NO_COLOR": "1"}


class WarmRunner:
    def __init__(self, base_env=None):
        """base_env (default: this process's environment now): what the server and its children start from."""
        env = {k: v for k, v in (base_env or os.environ).items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env={**env, **ENV},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.lock = threading.Lock()  # one run at a time: the server answers requests in order

    def run(self, script, argv, cwd=ROOT, stdin=b"", env=None, fsize=None, replace_env=False, timeout=600):
        """A run that has not ended after `timeout` seconds is killed and raises subprocess.TimeoutExpired (with
        what it printed), as subprocess.run(timeout=...) does: a hung script fails its test, not the whole suite."""
        with self.lock, tempfile.TemporaryDirectory() as d:
            paths = {k: os.path.join(d, k) for k in ("stdin", "stdout", "stderr")}
            with open(paths["stdin"], "wb") as f:
                f.write(stdin)
            request = {"script": os.path.join(ROOT, script), "argv": [str(a) for a in argv], "cwd": str(cwd),
                       "env": env or {}, "replace_env": replace_env, "fsize": fsize, **paths}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = json.loads(self.proc.stdout.readline())["pid"]
            killed = threading.Event()

            def kill():
                killed.set()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

            timer = threading.Timer(timeout, kill)
            timer.start()
            try:
                returncode = json.loads(self.proc.stdout.readline())["returncode"]
            finally:
                timer.cancel()
            read = lambda k: open(paths[k], encoding="utf-8", errors="replace").read()  # noqa: E731
            if killed.is_set():
                raise subprocess.TimeoutExpired([script, *argv], timeout, read("stdout"), read("stderr"))
            return Result(returncode, read("stdout"), read("stderr"))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def _child(req):
    """In the forked child: become `python script argv...` and never return."""
    import resource
    import runpy
    import traceback
    code = 1
    try:
        os.chdir(req["cwd"])
        for fd, key, flags in ((0, "stdin", os.O_RDONLY), (1, "stdout", os.O_WRONLY | os.O_TRUNC | os.O_CREAT),
                               (2, "stderr", os.O_WRONLY | os.O_TRUNC | os.O_CREAT)):
            os.dup2(os.open(req[key], flags, 0o644), fd)
        sys.stdin = open(0, encoding="utf-8", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
        if req["replace_env"]:
            os.environ.clear()
        os.environ.update(req["env"])
        if req["fsize"] is not None:  # writes past it fail with EFBIG (Python ignores SIGXFSZ)
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        sys.argv = [req["script"], *req["argv"]]
        sys.path[0] = os.path.dirname(req["script"])
        runpy.run_path(req["script"], run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def serve():
    sys.path.insert(0, ROOT)
    # The slow imports, once. Nothing here runs model code, so forked children start with no threads busy.
    import fastapi  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import dataset.lm_dataset  # noqa: F401
    import model.model_lora  # noqa: F401
    import trainer_utils  # noqa: F401
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
