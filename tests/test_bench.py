"""tools/bench.py runs and writes its table; timings themselves are never asserted."""
import csv
import json
import sys
from pathlib import Path

import pytest
import torch

import vmamba

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench  # noqa: E402  (tools/bench.py)


def test_bench_writes_csv_and_json(tmp_path, capsys):
    out_csv, out_json = tmp_path / "bench.csv", tmp_path / "bench.json"
    threads = torch.get_num_threads()
    assert bench.main(["--model", "vmamba_tiny_s1l8", "--sizes", "32,48", "--repeats", "2",
                       "--warmup", "0", "--threads", "1", "--csv", str(out_csv), "--json", str(out_json)]) == 0
    assert torch.get_num_threads() == threads  # --threads holds for the run only
    rows = json.loads(out_json.read_text())
    assert [(r["model"], r["size"]) for r in rows] == [("vmamba_tiny_s1l8", 32), ("vmamba_tiny_s1l8", 48)]
    for r in rows:
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["min_ms"] > 0
        assert r["ratio"] == "-"  # nothing compared
        assert r["threads"] == 1 and r["compiled"] is False and r["compile_s"] is None
        assert r["faults"] == "-" if sys.platform == "win32" else isinstance(r["faults"], int) and r["faults"] >= 0
    with open(out_csv, newline="") as f:
        assert [r["size"] for r in csv.DictReader(f)] == ["32", "48"]
    assert "vmamba_tiny_s1l8" in capsys.readouterr().out


def test_bench_compares_with_timm_in_train_mode(tmp_path):
    pytest.importorskip("timm", reason="timm is not installed")
    out_json = tmp_path / "bench.json"
    assert bench.main(["--model", "vmamba_tiny_s1l8", "--compare", "resnet18", "--sizes", "32",
                       "--batch", "2", "--mode", "train", "--repeats", "1", "--warmup", "0",
                       "--json", str(out_json)]) == 0
    rows = {r["model"]: r for r in json.loads(out_json.read_text())}
    assert rows["resnet18"]["ratio"] == 1.0
    expected = rows["vmamba_tiny_s1l8"]["median_ms"] / rows["resnet18"]["median_ms"]  # medians rounded to 0.01 ms
    assert rows["vmamba_tiny_s1l8"]["ratio"] == pytest.approx(expected, rel=1e-3, abs=2e-3)
    assert all(r["mode"] == "train" and r["batch"] == 2 for r in rows.values())


def test_bench_compile_times_compiled_models_beside_eager(tmp_path):
    """Each model gets an eager and a compiled row; a compiled row holds its first call's
    seconds and its timings, or the compile error and none. The dynamo-only "eager"
    backend keeps this fast; the default is inductor."""
    pytest.importorskip("timm", reason="timm is not installed")
    out_json = tmp_path / "bench.json"
    rc = bench.main(["--model", "vmamba_tiny_s1l8", "--compare", "resnet18", "--sizes", "32", "--repeats", "2",
                     "--warmup", "0", "--compile", "--compile-backend", "eager", "--json", str(out_json)])
    rows = json.loads(out_json.read_text())
    assert [(r["model"], r["compiled"]) for r in rows] == [
        ("vmamba_tiny_s1l8", False), ("vmamba_tiny_s1l8", True), ("resnet18", False), ("resnet18", True)]
    failed = [r for r in rows if isinstance(r["compile_s"], str)]
    assert rc == (1 if failed else 0)
    for r in rows:
        if not r["compiled"]:
            assert r["compile_s"] is None and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        elif r in failed:
            assert r["compile_s"].startswith("failed: ") and r["median_ms"] == r["ratio"] == "-"
        else:
            assert r["compile_s"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    assert rows[3] not in failed  # resnet18 compiles with fullgraph=True
    assert rows[2]["ratio"] == 1.0 and rows[3]["ratio"] == pytest.approx(
        rows[3]["median_ms"] / rows[2]["median_ms"], rel=1e-3, abs=2e-3)  # against the eager resnet18


def test_bench_compile_does_not_apply_to_scan():
    with pytest.raises(SystemExit):
        bench.main(["--scan", "--compile"])


def test_scan_loop_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    KD, N, L = 8, 3, 17
    u, delta = torch.randn(2, KD, L, generator=g), torch.randn(2, KD, L, generator=g) - 1
    A = -torch.rand(KD, N, generator=g) - 0.1
    B, C = torch.randn(2, 4, N, L, generator=g), torch.randn(2, 4, N, L, generator=g)
    D, bias = torch.randn(KD, generator=g), torch.randn(KD, generator=g) * 0.1
    expected = vmamba.selective_scan_ref(u, delta, A, B, C, D=D, delta_bias=bias, delta_softplus=True)
    for scan in bench.SCAN_CONTENDERS.values():
        assert torch.allclose(scan(u, delta, A, B, C, D, bias).double(), expected, rtol=1e-4, atol=1e-5)


def test_interleaved_counts_the_page_faults_of_each_call():
    """A call that touches 64 fresh pages counts at least 64 minor faults; one that touches none, few."""
    pytest.importorskip("resource", reason="no resource module (Windows): faults are not counted")
    import mmap

    def touch_fresh_pages() -> None:
        with mmap.mmap(-1, 64 * mmap.PAGESIZE) as m:  # a new anonymous mapping: every page faults on first write
            for page in range(64):
                m[page * mmap.PAGESIZE] = 1
    times, faults = bench._interleaved({"fresh": touch_fresh_pages, "none": lambda: None}, 1, 3)
    assert [len(times[k]) for k in ("fresh", "none")] == [3, 3]
    assert min(faults["fresh"]) >= 64 and max(faults["none"]) < 16


def test_bench_scan_reports_every_case(capsys):
    assert bench.main(["--scan", "--repeats", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.startswith("K=4")]
    assert len(table) == 6  # three cases x (loop, selective_scan)
    assert sum("loop (unbind)" in line for line in table) == 3
    assert sum("selective_scan(backend='torch')" in line for line in table) == 3


def test_no_scan_keeps_every_layer_but_the_scan():
    """``_skip_term_only`` is ss2d_core with zero scan outputs (C = 0): under ``_without_scan``, an
    SS2D layer (eager or compiled) gives the output of the same layer with C = 0; outside it,
    the same compiled layer runs its scans again."""
    torch.manual_seed(0)
    layer = vmamba.SS2D(d_model=16, d_state=2, ssm_ratio=1.0).eval()
    torch.nn.init.constant_(layer.dt_projs_bias, 2.0)  # dt ~ 2: scans that matter to the output
    zero_c = vmamba.SS2D(d_model=16, d_state=2, ssm_ratio=1.0).eval()
    zero_c.load_state_dict(layer.state_dict())
    x = torch.randn(1, 6, 5, 16)
    with torch.no_grad():
        zero_c.x_proj_weight[:, -zero_c.d_state:] = 0  # C = 0: every scan output is zero
        with_scan, skip_only = layer(x), zero_c(x)
        assert (with_scan - skip_only).abs().max() > 1e-3  # float32 rounding: ~1e-6
        compiled = torch.compile(layer, fullgraph=True, backend="eager")
        for run in (layer, compiled, layer, compiled):
            with bench._without_scan():
                torch.testing.assert_close(run(x), skip_only)
            assert vmamba.ss2d_core is not bench._skip_term_only
            torch.testing.assert_close(run(x), with_scan)


def test_bench_no_scan_rows(tmp_path):
    out_json = tmp_path / "bench.json"
    assert bench.main(["--model", "vmamba_tiny_s1l8", "--sizes", "32", "--repeats", "1", "--warmup", "0",
                       "--no-scan", "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())
    assert [r["model"] for r in rows] == ["vmamba_tiny_s1l8", "vmamba_tiny_s1l8 (no scan)"]
    assert all(r["median_ms"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        bench.main(["--scan", "--no-scan"])


def test_report_writes_the_page_and_the_readme_table(tmp_path):
    """``report`` writes its page (machine, command, every table) and replaces only the marked README block."""
    pytest.importorskip("timm", reason="timm is not installed")
    out, readme = tmp_path / "docs" / "performance.md", tmp_path / "README.md"
    readme.write_text(f"before\n{bench.README_BEGIN}\nold figures\n{bench.README_END}\nafter\n")
    assert bench.main(["report", "--quick", "--out", str(out), "--readme", str(readme)]) == 0
    page = out.read_text()
    assert f"python tools/bench.py report --quick --out {out}" in page
    for heading in ("## Inference", "## Training step", "## The selective scan alone"):
        assert heading in page
    for name in ("vmamba_tiny_s1l8", *bench.REPORT_COMPARE, "torch threads", torch.__version__):
        assert name in page
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith(f"{bench.README_END}\nafter\n")
    assert "old figures" not in text and "/ convnext_tiny" in text and "32 px | eager" in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        bench.main(["report", "--quick", "--out", str(out), "--readme", str(readme)])
