"""benchmarks/gpu_check.py on a machine without CUDA: the CPU part runs, every GPU part says it
was skipped, the JSON is written (no wall-clock assertions)."""

from __future__ import annotations

import json

import torch

from benchmarks import gpu_check


def test_quick_cpu_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU path even on a GPU box
    out = tmp_path / "gpu_check.json"
    returned = gpu_check.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["quick"] is True
    cpu = data["cpu_env"]
    assert cpu["skipped"] is False and "error" not in cpu
    assert cpu["result"]["B"] == 1024
    assert cpu["locator_steps_per_s"] > 0
    assert cpu["matmul_gflops"] > 0
    assert cpu["ratio_to_matmul"] > 0
    for key in ("cuda_env", "features", "live", "agreement"):
        assert data[key]["skipped"] is True, key
        assert data[key]["reason"] == gpu_check.NO_CUDA
    assert returned["cpu_env"]["ratio_to_matmul"] == cpu["ratio_to_matmul"]
    printed = capsys.readouterr().out
    assert printed.count(gpu_check.NO_CUDA) >= 4
