"""tools/gpu_check.py without a GPU: it refuses at once (status 2), and its --small mode runs
every section on CPU (Triton kernels interpreted, tiny sizes) within a short time budget."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"


def run_script(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def test_no_cuda_exits_2_with_message(tmp_path):
    proc = run_script("--out", str(tmp_path), env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr and "--small" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.triton
def test_small_mode_runs_every_section(tmp_path):
    pytest.importorskip("triton", reason="triton is not installed")
    pytest.importorskip("timm", reason="timm is not installed")
    proc = run_script("--small", "--budget", "150", "--out", str(tmp_path))   # room for a busy machine
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["ok"] and data["info"]["small"]
    assert data["info"]["bytes_model"]["new"]["model_gb"] < data["info"]["bytes_model"]["old"]["model_gb"]
    names = " ".join(c["name"] for c in data["checks"])
    for part in ("scan triton", "scan torch", "SS2D fused v05_noz", "SS2D fused v0", "model vanilla_vmamba_tiny",
                 "model vmamba_tiny_s1l8", "torch.compile", "compiled bf16 training step, batch 2 then 3"):
        assert part in names, part
    # Throughput runs what fits in the budget; each (model, mode) is measured or noted as skipped.
    assert "throughput" in data["info"]["section_s"]
    measured = {(r["model"], r["mode"], r["compiled"]) for r in data["throughput"]}
    assert all(r["img_per_s"] for r in data["throughput"] if r["samples_s"])
    for model in ("vmamba_tiny_s1l8", "convnext_tiny"):
        for mode in ("infer_fp32_tf32", "infer_bf16", "train_bf16"):
            for compiled in (False, True):
                skipped = [n for n in data["notes"] if n.startswith(f"skipped {model} ") and mode in n]
                assert (model, mode, compiled) in measured or skipped, (model, mode, compiled)
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| check |" in table and "| model | backend |" in table and table in proc.stdout
