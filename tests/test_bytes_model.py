"""tools/bytes_model.py: HBM bytes per step of VMamba-T's bfloat16 inference (and its SS2D layers' backward),
kernel by kernel, for SS2D's fused Triton path and the one before it (a model from the real launch shapes, not a
measurement)."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "bytes_model.py"


def test_bytes_model_runs_and_meets_the_ss2d_target(tmp_path):
    out = tmp_path / "bytes.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SS2D layer:" in proc.stdout and "Whole model:" in proc.stdout
    data = json.loads(out.read_text())
    old, new = data["totals"]["old"], data["totals"]["new"]
    assert data["ss2d_layers"] == 14 and round(data["map_elements"] / 1e6) == 202   # VMamba-T, batch 128, 224 px
    assert 120 < old["ss2d_per_element"] < 160 and 40 < old["model_gb"] < 50          # the path before (~143, ~45)
    assert new["ss2d_per_element"] <= 60 and new["model_gb"] < old["model_gb"] - 15
    kernels = {r["kernel"]: r for r in data["kernels"]}
    assert kernels["fused SS2D scan kernel"]["new_calls"] == 14 and kernels["cross-scan kernel"]["new_calls"] == 0
    # the block norms: two add + LayerNorm kernels a block (norm; add and norm2), no torch LayerNorm, no casts
    norms = kernels["add + LayerNorm kernel (block norms)"]
    assert norms["new_calls"] == 28 and norms["old_calls"] == 0 and kernels["LayerNorm (block norms)"]["new_calls"] == 0
    assert kernels["cast to bfloat16 (in_proj)"]["new_calls"] == kernels["cast to bfloat16 (fc1)"]["new_calls"] == 0
    assert kernels["residual add"]["new_calls"] == 14 and new["model_gb"] <= 25                  # ~24.9
    # the stem's and downsampling's norms: the same kernel without the add, no torch LayerNorm, no cast up
    assert kernels["LayerNorm kernel (stem and downsampling norms)"]["new_calls"] == 5
    assert kernels["LayerNorm (stem and downsampling norms)"]["new_calls"] == 0
    # Training: the fused backward kernel replaces the selective-scan backward and the cross-scan/merge adjoints.
    assert "SS2D layer backward:" in proc.stdout
    backward = {r["kernel"]: r for r in data["backward_kernels"]}
    assert backward["fused SS2D scan backward kernel"]["new_calls"] == 14
    assert backward["selective-scan backward kernel"]["new_calls"] == 0
    assert backward["fused SS2D scan backward kernel"]["new_per_element"] <= 35                 # ~30.5
    assert 200 < old["ss2d_backward_per_element"] < 300 and new["ss2d_backward_per_element"] < 110   # ~249, ~101
    assert 350 < old["ss2d_training_per_element"] and new["ss2d_training_per_element"] <= 150   # ~382 -> ~147
    # the D term's gradients come from the scan's backward kernel: one add of x's gradients (scan, x_proj), not two
    assert backward["add (gradients of x)"]["new_per_element"] == backward["add (gradients of x)"]["old_per_element"] / 2
