"""tools/export_check.py exports, runs and compares; a path that differs from eager fails it."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import export_check  # noqa: E402  (tools/export_check.py)

PATHS = "torch.export (dynamic batch),onnx legacy (static)"


def test_export_check_passes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "export.json"
    args = ["--small", "--size", "32", "--batches", "1,3", "--paths", PATHS, "--threads", "1", "--json", str(out)]
    threads = torch.get_num_threads()
    assert export_check.main(args) == 0
    assert torch.get_num_threads() == threads
    rows = json.loads(out.read_text())
    assert [r["path"] for r in rows] == PATHS.split(",")
    assert [r["batches"] for r in rows] == ["1,3", "1"]   # a static export runs at its own batch only
    for r in rows:
        assert r["status"] == "ok" and float(r["max_rel_err"]) < 1e-4 and r["export_s"] > 0 and r["nodes"] > 0
    assert "torch.export (dynamic batch)" in capsys.readouterr().out


def test_export_check_fails_beyond_its_tolerance(tmp_path):
    out = tmp_path / "export.json"
    args = ["--small", "--size", "32", "--batches", "2", "--paths", "onnx legacy (static)", "--tol", "-1",
            "--json", str(out)]
    assert export_check.main(args) == 1
    (row,) = json.loads(out.read_text())
    assert row["status"].startswith("FAILED: differs from eager")
