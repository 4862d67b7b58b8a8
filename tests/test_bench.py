"""The benchmark tools: bench_train.py's JSON and profiles on the CPU, and gpu_report.py rebuilding the committed
GPU table (benchmarks/gpu.md) from the raw files beside it."""
import json
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))


def test_committed_gpu_table_is_rebuilt_from_its_raw_files():
    import gpu_report
    generated = gpu_report.report(os.path.join(ROOT, "benchmarks", "gpu_2026-11-28"))
    rows = [line for line in generated.splitlines() if line.startswith(("| ours", "| MiniMind"))]
    assert len(rows) == 11
    with open(os.path.join(ROOT, "benchmarks", "gpu.md"), encoding="utf-8") as f:
        committed = f.read()
    assert all(row in committed for row in rows)
    assert "14 passed" in generated and "| ours | 26M | 512 | 128 | 1 | 0 | full | 1.222M |" in generated


def test_bench_train_writes_rows_profiles_and_keeps_going_after_a_failed_run(tmp_path, monkeypatch):
    import bench_train
    import train_pretrain
    from model import model_minimind
    monkeypatch.setattr(model_minimind, "PACKED_ATTENTION", None)  # each run sets it; put it back afterwards
    real_main, calls = train_pretrain.main, []

    def main_failing_second_run():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        real_main()
    monkeypatch.setattr(train_pretrain, "main", main_failing_second_run)
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--device", "cpu", "--presets", "tiny-cpu", "--batch_size", "2", "4", "8",
                                      "--steps", "4", "--measure", "2", "--num_workers", "0", "--json", str(out),
                                      "--profile_dir", str(tmp_path / "profiles")])
    bench_train.main()
    rows = json.loads(out.read_text())
    assert [r["batch_size"] for r in rows] == [2, 4, 8]
    assert rows[1]["error"] == "RuntimeError: injected failure" and "tokens_per_s" not in rows[1]
    for r in (rows[0], rows[2]):
        assert r["tokens_per_s"] > 0 and r["nonpad_tokens_per_s"] == pytest.approx(r["tokens_per_s"]) and "error" not in r
    profiles = sorted(os.listdir(tmp_path / "profiles"))
    assert profiles == ["profile_tiny-cpu_b2_c0_p0.txt", "profile_tiny-cpu_b8_c0_p0.txt"]
    text = (tmp_path / "profiles" / profiles[0]).read_text()
    assert text.startswith("5 profiled steps") and "aten::mm" in text
