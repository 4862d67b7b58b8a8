import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TOKENIZER = os.path.join(ROOT, "model")
SESSION_ENV = dict(os.environ)  # before any test's monkeypatch: the warm runner starts from this, whichever test starts it

# Tests of what must also hold on a GPU take a `device` argument: the "cpu" case runs everywhere, the "cuda"
# case carries the `cuda` marker, is skipped (with the reason) on a machine without a GPU, and is what
# `pytest -m cuda` selects (scripts/gpu_check.sh runs them on a GPU machine).
ON_CPU_AND_CUDA = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one (scripts/gpu_check.sh runs them)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: this machine has none (scripts/gpu_check.sh runs the cuda tests on one)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


_warm_runner = None
_warm_runner_lock = threading.Lock()


def warm_runner():
    """The session's one WarmRunner (tests/script_runner.py), started on first use."""
    global _warm_runner
    with _warm_runner_lock:
        if _warm_runner is None:
            from script_runner import WarmRunner
            _warm_runner = WarmRunner(SESSION_ENV)
        return _warm_runner


def run_script(script, *flags, cwd=ROOT, stdin="", env=None):
    """`python {script} {flags}` with this process's environment (plus PYTHONPATH=ROOT, OMP_NUM_THREADS=1 and
    `env`) and `stdin` piped in, run in a child forked from one warm process (tests/script_runner.py): the same
    run and exit status, without paying 5-7 s of imports for each. -> Result(returncode, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env or {}))
    return warm_runner().run(script, [str(f) for f in flags], cwd=cwd, stdin=stdin.encode("utf-8"), env=env,
                             replace_env=True)


def pytest_sessionfinish(session, exitstatus):
    if _warm_runner is not None:
        _warm_runner.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(work_dir, *flags):
    """A real scripts/serve_openai_api.py process on a free port. Yields {"base", "proc", "log"} once
    /v1/models answers (the wait only guards against a hang: 300 s on a loaded machine)."""
    port = free_port()
    log_path = os.path.join(work_dir, "server.log")
    log = open(log_path, "w+")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "serve_openai_api.py"), *map(str, flags),
                             "--tokenizer_path", TOKENIZER, "--port", str(port), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=work_dir)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                log.seek(0)
                pytest.fail(f"server did not answer /v1/models within 300 s:\n{log.read()[-3000:]}")
            time.sleep(0.3)
        yield {"base": base, "proc": proc, "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def tiny_chat_weight(tmp_path_factory):
    """A tiny model trained (seconds) to replay a few conversations: a tool call, a think block, a <script>
    reply, an endless song (tests/tiny_chat.py)."""
    from tiny_chat import train_tiny_chat_model
    return train_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat")))


@pytest.fixture(scope="session")
def broken_call_weight(tmp_path_factory):
    """A tiny model that learned one reply, a tool call that is not JSON (tests/tiny_chat.py BROKEN_REPLY)."""
    from tiny_chat import BROKEN_CONVERSATIONS, train_tiny_chat_model
    return train_tiny_chat_model(str(tmp_path_factory.mktemp("broken_call")), conversations=BROKEN_CONVERSATIONS, sing=False)


@pytest.fixture(scope="session")
def chat_server(tmp_path_factory, tiny_chat_weight):
    """The server on the tiny chat model, running the calculator tool for the web page."""
    with serve_process(str(tmp_path_factory.mktemp("chat_server")), "--weight", tiny_chat_weight, "--max_seq_len", 2048,
                       "--tools", "calculator", "--served_model_name", "tiny-chat") as server:
        yield server
