"""Numerics at the edges, property-based shapes, threads and determinism."""
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vmamba


def _inputs(b, k, d, n, l, dtype=torch.float32, seed=0, dt_scale=1.0, a_min=1.0, a_max=16.0):
    """Positional (u, delta, A, B, C, D) and keyword (delta_bias, delta_softplus) arguments."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, k * d, l, generator=g)
    delta = torch.randn(b, k * d, l, generator=g) * dt_scale
    A = -(a_min + (a_max - a_min) * torch.rand(k * d, n, generator=g))
    B = torch.randn(b, k, n, l, generator=g)
    C = torch.randn(b, k, n, l, generator=g)
    D = torch.randn(k * d, generator=g)
    bias = torch.randn(k * d, generator=g) * 0.5
    args = [t.to(dtype) for t in (u, delta)] + [A] + [t.to(dtype) for t in (B, C)] + [D]
    return args, dict(delta_bias=bias, delta_softplus=True)


def _rel(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), k=st.sampled_from([1, 2, 4]), d=st.integers(1, 5), n=st.sampled_from([1, 3, 16]),
       l=st.integers(1, 300), seed=st.integers(0, 2**16), ungrouped=st.booleans(), gated=st.booleans())
def test_scan_matches_oracle_on_any_shape(b, k, d, n, l, seed, ungrouped, gated):
    args, kwargs = _inputs(b, k, d, n, l, seed=seed)
    if ungrouped:  # mamba_ssm's (B, N, L) layout: one group
        args[3], args[4] = args[3][:, 0], args[4][:, 0]
    if gated:
        kwargs["z"] = torch.randn_like(args[0])
    y = vmamba.selective_scan(*args, **kwargs)
    assert y.dtype == torch.float32
    assert _rel(y, vmamba.selective_scan_ref(*args, **kwargs)) < 1e-5


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9), d=st.integers(1, 4),
       n=st.sampled_from([1, 4]), seed=st.integers(0, 2**16))
def test_ss2d_core_matches_oracle_on_any_map(b, h, w, d, n, seed):
    g = torch.Generator().manual_seed(seed)
    r = 2
    x = torch.randn(b, h, w, d, generator=g)
    xw = torch.randn(4, r + 2 * n, d, generator=g)
    dw = torch.randn(4, d, r, generator=g)
    db = torch.randn(4, d, generator=g) * 0.5
    A_logs = torch.rand(4 * d, n, generator=g)
    Ds = torch.randn(4 * d, generator=g)
    got = vmamba.ss2d_core(x, xw, dw, db, A_logs, Ds, backend="torch")
    xs = vmamba.cross_scan(x.permute(0, 3, 1, 2).double())                       # (B, 4, D, L)
    proj = torch.einsum("bkdl,kcd->bkcl", xs, xw.double())
    dts, Bs, Cs = proj.split([r, n, n], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, dw.double())
    ys = vmamba.selective_scan_ref(xs.flatten(1, 2), dts.flatten(1, 2), -torch.exp(A_logs.double()), Bs, Cs,
                                   Ds, delta_bias=db.flatten(), delta_softplus=True)
    ref = vmamba.cross_merge(ys.view(b, 4, d, h, w)).permute(0, 2, 3, 1)
    assert _rel(got, ref) < 1e-5


@pytest.mark.parametrize("n", [1, 16])
def test_scan_extremes_stay_finite_and_accurate(n):
    """L = 65536, dt up to 20 after softplus, A down to -50."""
    args, kwargs = _inputs(1, 1, 2, n, 65536, dt_scale=12.0, a_min=0.01, a_max=50.0)
    y = vmamba.selective_scan(*args, **kwargs)
    assert y.isfinite().all()
    assert _rel(y, vmamba.selective_scan_ref(*args, **kwargs)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scan_low_precision_inputs(dtype):
    """Computed in float32 on the rounded inputs; only the output is rounded to u's dtype."""
    args, kwargs = _inputs(2, 4, 3, 16, 257, dtype=dtype)
    y, last = vmamba.selective_scan(*args, **kwargs, return_last_state=True)
    ref, ref_last = vmamba.selective_scan_ref(*args, **kwargs, return_last_state=True)
    assert y.dtype == dtype and y.isfinite().all()
    assert _rel(y, ref) <= torch.finfo(dtype).eps      # the output's own rounding, no more
    assert last.dtype == torch.float32 and _rel(last, ref_last) < 1e-5


def test_zoo_model_in_bf16_autocast_stays_close():
    model = vmamba.vmamba_tiny_s1l8(depths=[1, 1, 2, 1]).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x).float()
    assert out.isfinite().all()
    assert torch.nn.functional.cosine_similarity(out, ref).item() > 0.99


def test_threads_share_one_model():
    model = vmamba.VSSM(depths=[1, 1, 1, 1], dims=16, num_classes=5).eval()
    xs = [torch.randn(1, 3, 40 + 8 * (i % 3), 48) for i in range(8)]
    with torch.no_grad():
        expected = [model(x) for x in xs]
    results = [None] * 8

    def work(i):
        with torch.no_grad():
            results[i] = model(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_same_seed_same_input_bit_identical():
    def run():
        torch.manual_seed(123)
        model = vmamba.VSSM(depths=[1, 1, 1, 1], dims=16, num_classes=5)
        x = torch.randn(2, 3, 48, 40)
        out = model(x)
        out.sum().backward()
        return out.detach(), model.layers[0].blocks[0].op.A_logs.grad

    (a, ga), (b, gb) = run(), run()
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_check_finite_option():
    model = vmamba.VSSM(depths=[1, 1, 1, 1], dims=8, check_finite=True)
    x = torch.randn(1, 3, 32, 32)
    x[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(x)
