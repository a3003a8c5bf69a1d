"""tools/analysis.py: the ERF is global for VMamba and local for convolutions, the implicit
attention reproduces the layer exactly, and each command writes its PNG and finite numbers."""
import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import vmamba

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import analysis  # noqa: E402  (tools/analysis.py)

TINY = dict(depths=[1, 1, 1, 1], dims=16, num_classes=10)
DPI = 50
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="the analysis commands plot with matplotlib (pip install matplotlib)")


def test_erf_of_a_vmamba_stage_is_global_and_of_a_conv_stack_is_not():
    images = torch.randn(2, 3, 64, 64)
    model = vmamba.VSSM(**TINY).eval()
    erf = analysis.effective_receptive_field(analysis.stage_features(model, 0), images)
    corners = erf[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert erf.shape == (64, 64) and (corners > 0).all(), corners

    # The same depth of 3x3 convolutions: the patch embedding's two and the block's one.
    convs = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.GELU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.GELU(),
                          nn.Conv2d(16, 16, 3, padding=1))
    erf = analysis.effective_receptive_field(convs, images)
    corners = erf[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 0).all() and erf[32, 32] > 0
    rows, cols = erf.nonzero().unbind(1)
    assert rows.max() - rows.min() < 16 and cols.max() - cols.min() < 16   # 15 px receptive field


def test_erf_summary():
    delta = torch.zeros(9, 9, dtype=torch.float64)
    delta[4, 4] = 1
    stats = analysis.erf_summary(delta)
    assert all(r == pytest.approx(1 / 81) for r in stats["area_ratio"].values())
    assert stats["coverage"] == pytest.approx(1 / 81) and stats["corners"] == [0, 0, 0, 0]
    stats = analysis.erf_summary(torch.ones(9, 9, dtype=torch.float64))
    assert stats["area_ratio"]["0.2"] == pytest.approx(25 / 81)          # 5x5 holds 25/81 >= 0.2
    assert stats["area_ratio"]["0.99"] == 1.0 and stats["corners"] == [1, 1, 1, 1]


def _four_scans(op, u):
    """SS2D's four selective scans of its scan input u (B, H, W, D), composed from the public
    cross_scan, selective_scan and cross_merge; (B, H, W, D)."""
    b, h, w, d = u.shape
    n, r = op.d_state, op.dt_rank
    xs = vmamba.cross_scan(u.permute(0, 3, 1, 2).contiguous())        # (B, 4, D, L)
    proj = torch.einsum("bkdl,kcd->bkcl", xs, op.x_proj_weight)       # (B, 4, R+2N, L)
    dts, Bs, Cs = proj.split([r, n, n], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, op.dt_projs_weight)     # (B, 4, D, L)
    ys = vmamba.selective_scan(xs.reshape(b, 4 * d, h * w), dts.reshape(b, 4 * d, h * w),
                               -torch.exp(op.A_logs), Bs.contiguous(), Cs.contiguous(), D=op.Ds,
                               delta_bias=op.dt_projs_bias.reshape(-1), delta_softplus=True,
                               backend="torch")                       # (B, 4*D, L)
    return vmamba.cross_merge(ys.view(b, 4, d, h, w)).permute(0, 2, 3, 1)


@pytest.mark.parametrize("d_conv", [3, 1])
def test_ss2d_attention_reproduces_the_layer(d_conv):
    h, w = 4, 5
    op = vmamba.SS2D(d_model=6, d_state=3, ssm_ratio=1.0, d_conv=d_conv, forward_type="v05_noz")
    with torch.no_grad():
        op.dt_projs_bias.add_(2.0)           # long steps: strongly varying decays
        op.x_proj_weight.mul_(3.0)
    x = torch.randn(1, h, w, 6)
    with analysis.capture_scan_input(op) as captured:
        out = op(x)
    u = captured[0][0]                                                # (H, W, D)
    y = _four_scans(op, u[None])[0]                                   # (H, W, D)
    assert torch.allclose(op.out_proj(op.out_norm(y)), out[0], atol=1e-5)   # the captured input is scanned

    skip = op.Ds.detach().double().view(4, -1).sum(0)                 # (D,) one skip per scan
    ud = u.double().permute(2, 0, 1)                                  # (D, H, W)
    for i in range(h):
        for j in range(w):
            rows = analysis.ss2d_attention(op, u, (i, j))               # (4, D, H, W)
            expected = (rows.sum(0) * ud).sum((1, 2)) + skip * ud[:, i, j]
            assert torch.allclose(expected.float(), y[i, j], rtol=1e-4, atol=1e-5), (i, j)

    # Causality in each scan's order: nothing from pixels it reaches after the query.
    rows = analysis.ss2d_attention(op, u, (1, 2)).flatten(2)           # (4, D, L) by pixel
    order = analysis.scan_order(h, w)
    for k in range(4):
        t = int((order[k] == 1 * w + 2).nonzero())
        assert (rows[k][:, order[k, t + 1:]] == 0).all() and (rows[k][:, order[k, :t + 1]] != 0).all()


def test_loglog_slope():
    xs = [224 ** 2, 384 ** 2, 512 ** 2]
    assert analysis.loglog_slope(xs, [3 * x ** 1.5 for x in xs]) == pytest.approx(1.5)
    assert analysis.loglog_slope(xs, [1.0, float("nan"), 4.0]) == pytest.approx(math.log(4) / math.log(xs[2] / xs[0]))
    assert math.isnan(analysis.loglog_slope(xs[:1], [1.0]))


def test_optional_dependency_names_its_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        analysis.main(["erf", "--config", json.dumps(TINY), "--out", str(tmp_path / "erf.png")])


# ---- the commands, on a tiny random model ------------------------------------------------

def _png_shape(path):
    from matplotlib.image import imread
    return imread(str(path)).shape[:2]


def _finite(values):
    """Every number in a nested JSON value is finite."""
    if isinstance(values, dict):
        return all(_finite(v) for v in values.values())
    if isinstance(values, list):
        return all(_finite(v) for v in values)
    return not isinstance(values, float) or math.isfinite(values)


def _photos(tmp_path, n=2):
    from matplotlib.image import imsave
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(n):
        imsave(folder / f"{i}.png", torch.rand(48, 80, 3).numpy())
    return folder


@needs_matplotlib
def test_erf_command(tmp_path):
    import numpy as np
    out = tmp_path / "erf.png"
    rc = analysis.main(["erf", "--model", "vmamba_tiny_s1l8,vanilla_vmamba_tiny", "--config", json.dumps(TINY),
                      "--images", str(_photos(tmp_path)), "--size", "64", "--stage", "0",
                      "--device", "cpu", "--out", str(out), "--dpi", str(DPI)])
    assert rc == 0
    assert _png_shape(out) == (round(3.2 * DPI), round((3.0 * 2 + 1.0) * DPI))
    stats = json.loads((tmp_path / "erf.json").read_text())
    assert stats["num_images"] == 2 and set(stats["models"]) == {"vmamba_tiny_s1l8", "vanilla_vmamba_tiny"}
    assert _finite(stats)
    maps = np.load(tmp_path / "erf.npz")
    for name in maps.files:
        assert maps[name].shape == (64, 64) and np.isfinite(maps[name]).all() and maps[name].min() > 0


@needs_matplotlib
def test_activations_command(tmp_path):
    out = tmp_path / "act.png"
    image = _photos(tmp_path, 1) / "0.png"
    rc = analysis.main(["activations", "--config", json.dumps(TINY), "--image", str(image), "--size", "64",
                      "--stage", "1", "--block", "0", "--query", "0.25", "0.75", "--device", "cpu",
                      "--out", str(out), "--dpi", str(DPI)])
    assert rc == 0
    assert _png_shape(out) == (round(4.9 * DPI), round(2.2 * 5 * DPI))
    data = json.loads((tmp_path / "act.json").read_text())
    assert [len(m) for m in data["activation_maps"]] == [16, 8, 4, 2]
    att = data["attention"]
    assert att["map_size"] == [8, 8] and att["query"] == [2, 6]
    assert torch.tensor(att["scans"]).shape == (4, 8, 8)
    assert _finite(data)


@needs_matplotlib
def test_scaling_command(tmp_path):
    out = tmp_path / "scaling.png"
    rc = analysis.main(["scaling", "--config", json.dumps(TINY), "--sizes", "32,64", "--repeats", "2",
                      "--device", "cpu", "--out", str(out), "--dpi", str(DPI)])
    assert rc == 0
    assert _png_shape(out) == (round(4.2 * DPI), round(13.5 * DPI))
    with open(tmp_path / "scaling.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["size"]) for r in rows] == [32, 64]
    columns = ["latency_ms", "throughput"] + (["peak_mem_mib"] if sys.platform.startswith("linux") else [])
    for r in rows:
        assert all(math.isfinite(float(r[c])) and float(r[c]) >= 0 for c in columns), r


@needs_matplotlib
def test_timm_models_side_by_side(tmp_path):
    pytest.importorskip("timm", reason="timm models are compared only when timm is installed (pip install timm)")
    out = tmp_path / "erf.png"
    rc = analysis.main(["erf", "--model", "resnet18", "--images", str(_photos(tmp_path, 1)), "--size", "64",
                      "--device", "cpu", "--out", str(out), "--dpi", str(DPI)])
    assert rc == 0 and _finite(json.loads((tmp_path / "erf.json").read_text()))
    rc = analysis.main(["scaling", "--models", "resnet18", "--sizes", "32,64", "--repeats", "1", "--no-memory",
                      "--device", "cpu", "--out", str(tmp_path / "scaling.png"), "--dpi", str(DPI)])
    assert rc == 0


def test_scaling_runs_without_out_or_model(tmp_path, monkeypatch, capsys):
    """Without --out nothing is plotted or written (so matplotlib is not needed), and without
    --model the default zoo model is measured."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert analysis.main(["scaling", "--sizes", "32,48", "--repeats", "1", "--warmup", "0", "--no-memory",
                          "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "vmamba_tiny_s1l8" in out and "fitted exponents" in out
    assert list(tmp_path.iterdir()) == []


@needs_matplotlib
def test_highres_command(tmp_path, capsys):
    """Each size in a fresh process: time, time per pixel and peak memory, and the plot, .csv and .md."""
    out = tmp_path / "highres.png"
    assert analysis.main(["highres", "--config", json.dumps(TINY), "--sizes", "32,48", "--threads", "1",
                          "--repeats", "2", "--out", str(out), "--dpi", str(DPI)]) == 0
    with open(tmp_path / "highres.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["size"]) for r in rows] == [32, 48] and all(r["finite"] == "True" for r in rows)
    assert all(float(r["seconds"]) > 0 and float(r["ns_per_pixel"]) > 0 for r in rows)
    if sys.platform.startswith("linux"):
        assert all(float(r["peak_rss_kib"]) >= float(r["rss_before_kib"]) > 0 for r in rows)
    assert "| VSSM | 48 |" in (tmp_path / "highres.md").read_text() and _png_shape(out)[0] > 0


def test_flops_reproduce_the_published_table():
    rows = analysis.flops_table()
    assert [r["model"] for r in rows] == vmamba.list_models()
    for row in rows:
        assert abs(row["gflops"] / row["published_gflops"] - 1) < 0.03, row
        assert abs(row["params_m"] * 1e6 / vmamba._ZOO[row["model"]][2] - 1) < 1e-3, row


def test_flops_command(capsys):
    assert analysis.main(["flops", "--model", "vmamba_tiny_s1l8"]) == 0
    out = capsys.readouterr().out
    assert "vmamba_tiny_s1l8" in out and "4.9" in out
