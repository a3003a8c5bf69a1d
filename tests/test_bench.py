"""The bench command runs and writes its table; timings themselves are never asserted."""
import csv
import json

import pytest

import vmamba


def test_bench_writes_csv_and_json(tmp_path, capsys):
    out_csv, out_json = tmp_path / "bench.csv", tmp_path / "bench.json"
    assert vmamba.main(["bench", "--model", "vmamba_tiny_s1l8", "--sizes", "32,48", "--repeats", "2",
                        "--warmup", "0", "--threads", "1", "--csv", str(out_csv), "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())
    assert [(r["model"], r["size"]) for r in rows] == [("vmamba_tiny_s1l8", 32), ("vmamba_tiny_s1l8", 48)]
    for r in rows:
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["min_ms"] > 0
        assert r["ratio"] == "-"  # nothing compared
    with open(out_csv, newline="") as f:
        assert [r["size"] for r in csv.DictReader(f)] == ["32", "48"]
    assert "vmamba_tiny_s1l8" in capsys.readouterr().out


def test_bench_compares_with_timm_in_train_mode(tmp_path):
    pytest.importorskip("timm", reason="timm is not installed")
    out_json = tmp_path / "bench.json"
    assert vmamba.main(["bench", "--model", "vmamba_tiny_s1l8", "--compare", "resnet18", "--sizes", "32",
                        "--batch", "2", "--mode", "train", "--repeats", "1", "--warmup", "0",
                        "--json", str(out_json)]) == 0
    rows = {r["model"]: r for r in json.loads(out_json.read_text())}
    assert rows["resnet18"]["ratio"] == 1.0
    expected = rows["vmamba_tiny_s1l8"]["median_ms"] / rows["resnet18"]["median_ms"]  # medians rounded to 0.01 ms
    assert rows["vmamba_tiny_s1l8"]["ratio"] == pytest.approx(expected, rel=1e-3, abs=2e-3)
    assert all(r["mode"] == "train" and r["batch"] == 2 for r in rows.values())


def test_bench_scan_reports_every_case(capsys):
    assert vmamba.main(["bench", "--scan", "--repeats", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.startswith("K=4")]
    assert len(table) == 9  # three cases x (loop, selective_scan, fused SS2D)
    assert sum("loop (unbind)" in line for line in table) == 3
