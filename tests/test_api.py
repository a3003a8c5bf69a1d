"""The public API: builders pass everything through, bad input fails clearly."""
import ast
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import vmamba

TINY = dict(depths=[1, 1, 1, 1], dims=8, num_classes=3)


def test_cross_scan_is_the_index_construction():
    x = torch.randn(2, 3, 5, 7)
    xs = vmamba.cross_scan(x, backend="torch")
    b, c, h, w = x.shape
    expected = torch.empty(b, 4, c, h * w)
    for i in range(h):
        for j in range(w):
            expected[:, 0, :, i * w + j] = x[:, :, i, j]
            expected[:, 1, :, j * h + i] = x[:, :, i, j]
            expected[:, 2, :, h * w - 1 - (i * w + j)] = x[:, :, i, j]
            expected[:, 3, :, h * w - 1 - (j * h + i)] = x[:, :, i, j]
    assert torch.equal(xs, expected)


@pytest.mark.parametrize("hw", [(5, 7), (7, 5), (1, 6), (4, 4)])
def test_cross_merge_is_the_adjoint(hw):
    h, w = hw
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    y = torch.randn(2, 4, 3, h, w, dtype=torch.float64)
    lhs = (vmamba.cross_scan(x) * y.flatten(3)).sum()
    rhs = (x * vmamba.cross_merge(y)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12)
    x.requires_grad_(True)
    vmamba.cross_scan(x).backward(y.flatten(3))
    assert torch.allclose(x.grad, vmamba.cross_merge(y))


def test_builders_pass_every_keyword_through():
    model = vmamba.vmamba_tiny_s1l8(num_classes=10, drop_path_rate=0.0, depths=[1, 1, 1, 1])
    assert model.num_classes == 10 and model.classifier.head.out_features == 10
    assert all(b.drop_path.drop_prob == 0.0 for layer in model.layers for b in layer.blocks)
    assert [len(layer.blocks) for layer in model.layers] == [1, 1, 1, 1]
    model = vmamba.create_model("vanilla_vmamba_tiny", num_classes=0, depths=[1, 1, 1, 1])
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 768)
    backbone = vmamba.create_model("vmamba_tiny_s1l8", features_only=True, out_indices=(1, 3),
                                   depths=[1, 1, 1, 1])
    assert isinstance(backbone, vmamba.Backbone_VSSM)
    assert [f.shape[1] for f in backbone(torch.randn(1, 3, 64, 64))] == [192, 768]


def test_drop_path_rates_rise_linearly():
    model = vmamba.VSSM(depths=[2, 3], dims=8, drop_path_rate=0.4)
    rates = [b.drop_path.drop_prob for layer in model.layers for b in layer.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("kwargs, match", [
    (dict(depths=[1, 0, 1, 1]), r"depths\[1\] must be an integer >= 1, got 0"),
    (dict(dims=0), r"dims\[0\] must be an integer >= 2"),
    (dict(drop_path_rate=1.5), r"drop_path_rate must be a number >= 0 and < 1, got 1.5"),
    (dict(num_classes=-1), r"num_classes must be an integer >= 0"),
    (dict(in_chans=0), r"in_chans must be an integer >= 1"),
    (dict(ssm_d_state=0), r"ssm_d_state must be an integer >= 1"),
    (dict(ssm_ratio=0.0), r"ssm_ratio must be a number > 0"),
    (dict(mlp_ratio=-1.0), r"mlp_ratio must be a number >= 0"),
    (dict(patch_size=3), r"patch_size must be even"),
    (dict(global_pool="max"), r"global_pool='max' is not supported; expected one of \['avg', ''\]"),
    (dict(forward_type="v3"), r"forward_type='v3' is not supported; expected one of \['v0', 'v05', 'v05_noz'\]"),
    (dict(norm_layer="bn"), r"norm_layer='bn'.*\['ln', 'ln2d'\]"),
    (dict(downsample_version="v4"), r"downsample_version='v4'"),
    (dict(patchembed_version="v3"), r"patchembed_version='v3'"),
    (dict(ssm_act_layer="relu"), r"ssm_act_layer='relu'"),
    (dict(dims=[8, 16]), r"one entry per stage"),
])
def test_unsupported_config_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vmamba.VSSM(**dict(TINY, **kwargs))


def test_unknown_keyword_and_model_name():
    with pytest.raises(TypeError, match="colour"):
        vmamba.VSSM(colour="blue")
    with pytest.raises(ValueError, match="unknown model 'vmamba_huge'.*vmamba_tiny_s1l8"):
        vmamba.create_model("vmamba_huge")


@pytest.mark.parametrize("x, error, match", [
    ("not a tensor", TypeError, "got str"),
    (torch.randn(3, 32, 32), ValueError, r"shape \(3, 32, 32\)"),
    (torch.randn(1, 1, 32, 32), ValueError, "got 1 channels"),
    (torch.randn(1, 32, 32, 3), ValueError, "channels-last input"),
    (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError, "dtype torch.uint8"),
    (torch.randn(1, 3, 2, 32), ValueError, "H, W >= 4"),
    (torch.randn(0, 3, 32, 32), ValueError, "batch >= 1"),
])
def test_bad_inputs_fail_clearly(x, error, match):
    model = vmamba.VSSM(**TINY)
    with pytest.raises(error, match=match):
        model(x)


def test_backend_selection_errors(monkeypatch):
    u = torch.randn(1, 8, 5)
    args = (u, u, -torch.ones(8, 2), torch.randn(1, 4, 2, 5), torch.randn(1, 4, 2, 5))
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        vmamba.selective_scan(*args, backend="cuda")
    with monkeypatch.context() as patch:   # without triton: how to install it
        patch.setattr(vmamba, "_HAS_TRITON", False)
        with pytest.raises(RuntimeError, match=r"backend 'triton' is not available; install it with"):
            vmamba.selective_scan(*args, backend="triton")
    if vmamba._mamba_selective_scan_fn is None:
        with pytest.raises(RuntimeError, match="pip install mamba-ssm"):
            vmamba.selective_scan(*args, backend="mamba_ssm")
    with pytest.raises(ValueError, match=r"B and C must both be \(B, N, L\) or \(B, G, N, L\)"):
        vmamba.selective_scan(u, u, -torch.ones(8, 2), torch.randn(1, 4, 2, 6), torch.randn(1, 4, 2, 6))
    with pytest.raises(ValueError, match=r"A must be \(G\*D, N\) = \(8, 2\)"):
        vmamba.selective_scan(u, u, -torch.ones(8, 3), *args[3:])
    with pytest.raises(ValueError, match=r"D must be \(8,\)"):
        vmamba.selective_scan(*args, D=torch.ones(4))
    with pytest.raises(TypeError, match="complex A is not supported"):
        vmamba.selective_scan(u, u, -torch.ones(8, 2, dtype=torch.cfloat), *args[3:])
    with pytest.raises(TypeError, match="delta must be a Tensor"):
        vmamba.selective_scan(u, 1.0, *args[2:])
    with pytest.raises(ValueError, match="unknown backend"):
        vmamba.set_backend("fast")
    assert vmamba.available_backends("cpu")[-1] == "torch"


def test_auto_prefers_the_fused_path_for_ss2d(monkeypatch):
    """On CUDA with both kernels installed, "auto" gives selective_scan mamba_ssm's kernel and SS2D the fused
    Triton path (no cross-scan copies); VMAMBA_BACKEND and set_backend still win over it. No GPU is needed: the
    choice depends only on the device type and what is installed."""
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setattr(vmamba, "_mamba_selective_scan_fn", lambda *args, **kwargs: None)
    monkeypatch.delenv("VMAMBA_BACKEND", raising=False)
    cuda = torch.device("cuda")
    assert vmamba.available_backends(cuda) == ["mamba_ssm", "triton", "torch"]
    assert vmamba._resolve_backend("auto", cuda) == "mamba_ssm"
    assert vmamba._resolve_backend("auto", cuda, ss2d=True) == "triton"
    monkeypatch.setenv("VMAMBA_BACKEND", "mamba_ssm")
    assert vmamba._resolve_backend("auto", cuda, ss2d=True) == "mamba_ssm"
    monkeypatch.setattr(vmamba, "_triton_usable", lambda device: False)
    monkeypatch.delenv("VMAMBA_BACKEND")
    assert vmamba._resolve_backend("auto", cuda, ss2d=True) == "mamba_ssm"
    assert vmamba._resolve_backend("auto", torch.device("cpu"), ss2d=True) == "torch"


def test_every_parameter_gets_a_gradient_and_checkpointing_matches():
    for cfg in (dict(forward_type="v0", mlp_ratio=0.0, downsample_version="v1", patchembed_version="v1",
                     ssm_d_state=4, ssm_ratio=2.0), dict(forward_type="v05")):
        model = vmamba.VSSM(**dict(TINY, drop_path_rate=0.0, **cfg))
        x = torch.randn(2, 3, 37, 45)
        model(x).square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
        model.zero_grad()
        model.set_grad_checkpointing(True)
        model(x).square().sum().backward()
        for n, p in model.named_parameters():
            assert torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-6), n


def test_bf16_autocast_on_cpu_stays_close_to_float32():
    model = vmamba.VSSM(**dict(TINY, dims=16)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.isfinite().all()
    assert ((out.float() - ref).abs().max() / ref.abs().max()) < 0.05


def test_model_cast_to_bfloat16_runs():
    model = vmamba.VSSM(**TINY).to(torch.bfloat16).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.isfinite().all()


def test_python_vmamba_py_runs_alone_in_an_empty_folder(tmp_path):
    """The drop-in promise: the file alone, run as a script, smoke-tests itself."""
    shutil.copy(vmamba.__file__, tmp_path / "vmamba.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ""
    result = subprocess.run([sys.executable, "vmamba.py", "--model", "vmamba_tiny_s1l8,vanilla_vmamba_tiny",
                             "--img-size", "48"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "vmamba_tiny_s1l8" in result.stdout and "all ok" in result.stdout
    help_text = subprocess.run([sys.executable, "vmamba.py", "--help"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120).stdout
    for option in ("--model", "--img-size", "--batch", "--device", "--pretrained"):
        assert option in help_text


def _module_level_names(tree):
    """{name: line of the top-level statement that first binds it}: functions, classes, assignments."""
    defs = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defs.setdefault(node.name, node.lineno)
        for target in getattr(node, "targets", []) + ([node.target] if isinstance(node, ast.AnnAssign) else []):
            for sub in ast.walk(target):
                if isinstance(sub, ast.Name):
                    defs.setdefault(sub.id, node.lineno)
    return defs


def test_the_file_reads_top_to_bottom():
    """No top-level statement uses a module-level name bound further down (not even inside a function body),
    and no private torch module or attribute is used."""
    with open(vmamba.__file__, encoding="utf-8") as file:
        source = file.read()
    tree = ast.parse(source)
    defs = _module_level_names(tree)
    early = [f"line {sub.lineno}: {sub.id} (bound at line {defs[sub.id]})"
             for node in tree.body for sub in ast.walk(node)
             if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and defs.get(sub.id, 0) > node.lineno]
    assert not early, early
    assert not re.findall(r"torch\._(?!_)\w+|nn\.modules\.module\.|_weights_only_unpickler", source)
