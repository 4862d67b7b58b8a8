"""requirements.txt lists exactly the third-party packages the code imports: nothing installed for nothing,
nothing imported that a fresh install lacks."""
import ast
import importlib.metadata
import os
import re
import sys

from conftest import ROOT

SKIP_DIRS = {"out", "shared", "__pycache__", "wandb"}


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(file="requirements.txt"):
    names = []
    with open(os.path.join(ROOT, file), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                names.append(re.match(r"[A-Za-z0-9._-]+", line).group(0))
    return names


def python_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS]
        yield from (os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))


def imports():
    """{top-level module: a file importing it} over every Python file of the repo, imports inside functions
    (the optional ones) included."""
    found = {}
    for path in python_files():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], os.path.relpath(path, ROOT))
    return found


def local_modules():
    """Modules of this repo: top-level scripts and packages, and the test helpers (conftest, test_*)."""
    names = set()
    for folder in (ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "scripts")):
        for entry in os.listdir(folder):
            if entry.endswith(".py"):
                names.add(entry[:-3])
            elif os.path.isdir(os.path.join(folder, entry)):
                names.add(entry)
    return names


def modules_of_distributions():
    """{canonical distribution name: its top-level modules} of what is installed."""
    out = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for d in dists:
            if module.isidentifier():  # not "pkg/__init__", which some installs report
                out.setdefault(canonical(d), set()).add(module)
    return out


def test_every_requirement_is_imported_somewhere():
    imported, provides = imports(), modules_of_distributions()
    for name in requirements():
        modules = provides.get(canonical(name)) or {name.replace("-", "_").lower()}  # not installed here: its own name
        assert modules & set(imported), f"requirements.txt lists {name}, but no file imports {' or '.join(sorted(modules))}"


# the distribution of a module whose import name differs, for when it is not installed here to ask
NOT_INSTALLED = {"llama_cpp": "llama-cpp-python"}


def test_every_third_party_import_is_listed():
    """requirements-optional.txt names what only skippable tests import (llama-cpp-python)."""
    listed = {canonical(n) for n in requirements() + requirements("requirements-optional.txt")}
    distributions = importlib.metadata.packages_distributions()
    local = local_modules()
    for module, where in sorted(imports().items()):
        if module in sys.stdlib_module_names or module in local or module == "__future__":
            continue
        dists = distributions.get(module) or [NOT_INSTALLED.get(module, module)]
        assert any(canonical(d) in listed for d in dists), \
            f"{where} imports {module} (from {', '.join(dists)}), which requirements.txt does not list"


def test_the_checks_see_what_they_should():
    """Guards the two tests above against passing vacuously (e.g. a parser that finds no imports)."""
    imported = imports()
    assert {"torch", "transformers", "datasets", "wandb", "numpy", "os"} <= set(imported)  # wandb/datasets: lazy imports
    assert "sentencepiece" not in imported and "sentencepiece" not in requirements()


def test_jsonl_needs_neither_datasets_nor_pyarrow(tmp_path):
    """`datasets` and pyarrow are imported only for parquet / Arrow inputs; without them jsonl still trains and
    a parquet input is a one-line error saying what to install."""
    import subprocess
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n', encoding="utf-8")
    code = f"""
import sys
sys.modules["datasets"] = sys.modules["pyarrow"] = None  # as if not installed: importing them raises ImportError
from dataset.lm_dataset import DataFormatError, PretrainDataset, load_tokenizer
import train_pretrain, train_full_sft, train_dpo
ds = PretrainDataset({str(tmp_path / "a.jsonl")!r}, load_tokenizer())
assert len(ds) == 1 and ds[0][0].numel() > 2
try:
    PretrainDataset({str(tmp_path / "a.parquet")!r}, load_tokenizer())
except DataFormatError as e:
    print(e)
"""
    (tmp_path / "a.parquet").write_bytes(b"x")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("needs the `datasets` package (pip install -r requirements.txt), or pass a jsonl file")
