"""The pure-PyTorch scan engine: values and gradients against a float64 per-step reference."""
import pytest
import torch

import vmamba as st
from vmamba import _selective_scan_torch as selective_scan_torch
from vmamba import _ss2d_scan_torch as ss2d_scan_torch
from vmamba import selective_scan_ref


def rel(a, b):
    """Max abs error relative to the reference's max magnitude."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_inputs(bsz, K, D, N, L, seed=0, dt_scale=0.5, dt_shift=-1.0, a_max=2.0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(bsz, K * D, L, generator=g)
    delta = torch.randn(bsz, K * D, L, generator=g) * dt_scale + dt_shift
    A = -(torch.rand(K * D, N, generator=g) * a_max + 0.05)
    B = torch.randn(bsz, K, N, L, generator=g)
    C = torch.randn(bsz, K, N, L, generator=g)
    Dv = torch.randn(K * D, generator=g)
    bias = torch.randn(K * D, generator=g) * 0.3
    return u, delta, A, B, C, Dv, bias


def check_grads(args, fast, ref, tol):
    """Compare values and gradients of fast (float32) and ref (float64) at the same inputs."""
    mask = [a is not None for a in args]
    a32 = [a.clone().requires_grad_() if a is not None else None for a in args]
    a64 = [a.double().requires_grad_() if a is not None else None for a in args]
    y = fast(*a32)
    yr = ref(*a64)
    assert y.dtype == torch.float32
    assert rel(y, yr) < tol
    gy = torch.randn(yr.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g32 = torch.autograd.grad(y, [a for a, m in zip(a32, mask) if m], gy.float())
    g64 = torch.autograd.grad(yr, [a for a, m in zip(a64, mask) if m], gy)
    for i, (p, q) in enumerate(zip(g32, g64)):
        assert p.shape == q.shape
        if q.abs().max() == 0:
            assert p.abs().max() < 1e-6, i
        else:
            assert rel(p, q) < tol, (i, rel(p, q))


LENGTHS = [1, 2, 7, 63, 64, 65, 1000, 3000]


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("N", [1, 16])
def test_selective_scan_grads(L, N):
    bsz, K = (2, 4) if L <= 1000 else (1, 1)
    D = 3 if L <= 1000 else 2
    u, delta, A, B, C, Dv, bias = make_inputs(bsz, K, D, N, L, seed=L + N)
    check_grads([u, delta, A, B, C, Dv, bias], selective_scan_torch, selective_scan_ref, 2e-5)


@pytest.mark.parametrize("use_D,use_bias,softplus", [(False, False, True), (True, False, False),
                                                       (False, True, False), (True, True, True)])
@pytest.mark.parametrize("K,bsz", [(1, 1), (4, 2)])
def test_selective_scan_options(use_D, use_bias, softplus, K, bsz):
    u, delta, A, B, C, Dv, bias = make_inputs(bsz, K, 3, 16, 130, seed=7)
    if not softplus:
        delta = delta.abs() * 0.3  # keep dt positive without softplus
    args = [u, delta, A, B, C, Dv if use_D else None, bias.abs() if use_bias else None]

    def fast(*a):
        return selective_scan_torch(*a, delta_softplus=softplus)

    def ref(*a):
        return selective_scan_ref(*a, delta_softplus=softplus)

    check_grads(args, fast, ref, 2e-5)


def test_eager_and_traceable_paths_agree():
    u, delta, A, B, C, Dv, bias = make_inputs(2, 4, 40, 16, 700, seed=3)
    z, dt = st._prep_dt(delta, bias, True)
    ins = st._ss_inputs(u, dt, A, B, C)
    y1 = st._scan_fwd(*ins, False, True)[0]
    y2 = st._scan_fwd(*ins, False, False)[0]
    assert (y1 - y2).abs().max() < 1e-5 * y1.abs().max()
    scratch = [t.clone() for t in ins[:2]]  # consume: dt and u are overwritten, y lands in dt
    y3 = st._scan_fwd(*scratch, *ins[2:], False, True, True)[0]
    assert y3.data_ptr() == scratch[0].data_ptr()
    assert (y1 - y3).abs().max() < 1e-5 * y1.abs().max()
    for N in (1, 16):
        args = make_ss2d(2, 9, 13, 40, N, seed=3)
        with torch.no_grad():
            y1 = ss2d_scan_torch(*args)  # inference: scans its own scratch copies in place
        y2 = ss2d_scan_torch(*[t.clone().requires_grad_() for t in args])  # autograd path
        assert (y1 - y2).abs().max() < 1e-5 * y1.abs().max()
        assert rel(y1, ss2d_composed(*args)) < 1e-5


@pytest.mark.parametrize("block_elems,seq_state,seq_carry", [
    (1, 10 ** 9, 64), (3000, 10 ** 9, 64), (3000, 10 ** 9, 0), (20000, 10 ** 9, 64), (20000, 10 ** 9, 0),
    (3000, 1, 64), (20000, 1, 64)])
def test_small_blocks(monkeypatch, block_elems, seq_state, seq_carry):
    """Force splitting into batch-row and chunk blocks that hand carries on, (small
    seq_state) the sequential one-chunk-per-block mode, and (seq_carry 0) the log-depth
    carry pass where the chunk-by-chunk one would run."""
    monkeypatch.setattr(st, "_BLOCK_ELEMS", block_elems)
    monkeypatch.setattr(st, "_SEQ_STATE", seq_state)
    monkeypatch.setattr(st, "_SEQ_CARRY", seq_carry)
    u, delta, A, B, C, Dv, bias = make_inputs(3, 2, 3, 4, 301, seed=13)
    check_grads([u, delta, A, B, C, Dv, bias], selective_scan_torch, selective_scan_ref, 2e-5)
    with torch.no_grad():  # the inference path adds carries straight into each chunk's first step
        ref = selective_scan_ref(*[t.double() for t in (u, delta, A, B, C, Dv, bias)])
        assert rel(selective_scan_torch(u, delta, A, B, C, Dv, bias), ref) < 1e-5
    check_grads(list(make_ss2d(3, 13, 11, 3, 4, seed=13)), ss2d_scan_torch, ss2d_composed, 2e-5)
    for N in (1, 4):
        args = make_ss2d(2, 13, 11, 3, N, seed=14)
        with torch.no_grad():
            assert rel(ss2d_scan_torch(*args), ss2d_composed(*args)) < 1e-5


@pytest.mark.parametrize("N", [1, 16])
def test_extreme_long_finite(N):
    """dt up to ~20 after softplus, A down to -50, L = 65536: finite and exact."""
    L, D = 65536, 2
    g = torch.Generator().manual_seed(5)
    u = torch.randn(1, D, L, generator=g)
    delta = torch.randn(1, D, L, generator=g) * 8  # softplus(delta) in (0, ~30]
    delta[..., ::97] = 20.0
    A = -torch.rand(D, N, generator=g) * 50
    A[0, 0] = -50.0
    A[-1, -1] = -1e-3  # slow decay: long memory over the whole sequence
    B = torch.randn(1, 1, N, L, generator=g)
    C = torch.randn(1, 1, N, L, generator=g)
    y = selective_scan_torch(u, delta, A, B, C, None, None, True)
    assert torch.isfinite(y).all()
    yr = selective_scan_ref(u, delta, A, B, C, None, None, True)
    assert rel(y, yr) < 1e-5


def test_extreme_grads_finite():
    L, D, N = 5000, 2, 16
    u, delta, A, B, C, Dv, bias = make_inputs(1, 1, D, N, L, seed=9, dt_scale=8, dt_shift=0, a_max=50)
    check_grads([u, delta, A, B, C, Dv, bias], selective_scan_torch, selective_scan_ref, 5e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    u, delta, A, B, C, Dv, bias = make_inputs(1, 4, 3, 16, 200, seed=11)
    args = [t.to(dtype) for t in (u, delta, A, B, C, Dv, bias)]
    args32 = [t.clone().requires_grad_() for t in args]
    y = selective_scan_torch(*args32)
    assert y.dtype == torch.float32
    yr = selective_scan_ref(*args)
    assert rel(y, yr) < 1e-5
    y.sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad.float()).all() for t in args32)


# ----------------------------------------------------------------------------
# SS2D
# ----------------------------------------------------------------------------
def make_ss2d(bsz, H, W, D, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, H, W, D, generator=g)
    dts = torch.randn(bsz, H, W, 4, D, generator=g) * 0.5 - 1
    A = -(torch.rand(4, D, N, generator=g) * 2 + 0.05)
    Bs = torch.randn(bsz, H, W, 4, N, generator=g)
    Cs = torch.randn(bsz, H, W, 4, N, generator=g)
    Ds = torch.randn(4, D, generator=g)
    db = torch.randn(4, D, generator=g) * 0.3
    return x, dts, A, Bs, Cs, Ds, db


def cross_scan(x):
    """(B, C, H, W) -> (B, 4, C, L)."""
    x0 = x.flatten(2)
    x1 = x.transpose(2, 3).flatten(2)
    return torch.stack([x0, x1, x0.flip(-1), x1.flip(-1)], 1)


def cross_merge(ys, H, W):
    """(B, 4, C, L) -> (B, C, H, W)."""
    bsz, _, C, L = ys.shape
    y0 = ys[:, 0] + ys[:, 2].flip(-1)
    y1 = ys[:, 1] + ys[:, 3].flip(-1)
    return y0.view(bsz, C, H, W) + y1.view(bsz, C, W, H).transpose(2, 3)


def ss2d_composed(x, dts, A, Bs, Cs, Ds, db, scan=selective_scan_ref):
    bsz, H, W, D = x.shape
    N = A.shape[-1]
    L = H * W
    xs = cross_scan(x.permute(0, 3, 1, 2)).reshape(bsz, 4 * D, L)
    # (B, H, W, 4, X) -> (B, 4, X, H, W) -> per direction k: cross_scan's k-th sequence
    per_dir = lambda t: torch.stack(
        [cross_scan(t.permute(0, 3, 4, 1, 2)[:, k])[:, k] for k in range(4)], 1)  # (B, 4, X, L)
    ys = scan(xs, per_dir(dts).reshape(bsz, 4 * D, L), A.reshape(4 * D, N), per_dir(Bs), per_dir(Cs),
              Ds.reshape(-1), db.reshape(-1), True)
    return cross_merge(ys.reshape(bsz, 4, D, L), H, W).permute(0, 2, 3, 1)


@pytest.mark.parametrize("bsz,H,W,D,N", [(1, 5, 7, 3, 16), (2, 7, 5, 4, 1), (1, 1, 9, 3, 16),
                                         (1, 9, 1, 3, 1), (2, 11, 13, 2, 16), (1, 1, 1, 3, 16),
                                         (1, 14, 14, 3, 1)])
def test_ss2d_grads(bsz, H, W, D, N):
    args = list(make_ss2d(bsz, H, W, D, N, seed=H * 100 + W))
    check_grads(args, ss2d_scan_torch, ss2d_composed, 2e-5)


def test_ss2d_matches_selective_scan_torch_large():
    args = make_ss2d(1, 40, 33, 24, 16, seed=4)
    y = ss2d_scan_torch(*args)
    y2 = ss2d_composed(*args, scan=selective_scan_torch)
    assert rel(y, y2) < 1e-5


def test_ss2d_optional_and_half():
    x, dts, A, Bs, Cs, Ds, db = make_ss2d(1, 6, 5, 3, 16, seed=2)
    dts = dts.abs() * 0.3  # positive dt without softplus
    y = ss2d_scan_torch(x, dts, A, Bs, Cs, None, None, False)
    zero = torch.zeros_like(Ds)
    yr = ss2d_composed(x, dts, A, Bs, Cs, zero, zero,
                       scan=lambda *a: selective_scan_ref(*a[:5], None, None, False))
    assert rel(y, yr) < 1e-5
    args = [t.to(torch.bfloat16).requires_grad_() for t in (x, dts, A, Bs, Cs, Ds, db)]
    y = ss2d_scan_torch(*args)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad.float()).all() for t in args)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_traced_matches_eager():
    """torch.jit.trace (what the ONNX exporter uses) takes the out-of-place path."""
    args = make_ss2d(2, 9, 7, 5, 16, seed=21)
    traced = torch.jit.trace(lambda *a: ss2d_scan_torch(*a), args, check_trace=False)
    assert rel(traced(*args), ss2d_scan_torch(*args)) < 1e-5
    u, delta, A, B, C, Dv, bias = make_inputs(1, 4, 3, 1, 300, seed=22)
    traced = torch.jit.trace(lambda *a: selective_scan_torch(*a), (u, delta, A, B, C, Dv, bias), check_trace=False)
    assert rel(traced(u, delta, A, B, C, Dv, bias), selective_scan_torch(u, delta, A, B, C, Dv, bias)) < 1e-5


@pytest.mark.parametrize("L", [1, 40])
def test_inference_leaves_inputs_untouched(L):
    """The in-place inference path must never write into the caller's tensors, even when
    the time-major layout is a view of them (L=1, or no bias and no softplus)."""
    args = list(make_inputs(1, 1, 3, 1, L, seed=31))
    args[-1] = None  # no delta_bias: the time-major dt may alias delta itself
    before = [None if t is None else t.clone() for t in args]
    with torch.no_grad():
        y = selective_scan_torch(*args, False)
    assert all(a is None or torch.equal(a, b) for a, b in zip(args, before))
    assert rel(y, selective_scan_ref(*before, False)) < 1e-5


def test_results_never_alias_work_buffers():
    """Outputs and gradients stay as they were when later calls reuse the per-thread work
    buffers; free_scan_buffers releases them and the next call rebuilds them."""
    args1, args2 = make_ss2d(1, 9, 8, 6, 1, seed=1), make_ss2d(1, 9, 8, 6, 1, seed=2)
    with torch.no_grad():
        y1 = ss2d_scan_torch(*args1)
        keep = y1.clone()
        ss2d_scan_torch(*args2)
    assert torch.equal(y1, keep)
    a = [t.clone().requires_grad_() for t in args1]
    grads = torch.autograd.grad(ss2d_scan_torch(*a).sum(), a)
    keep = [g.clone() for g in grads]
    b = [t.clone().requires_grad_() for t in args2]
    torch.autograd.grad(ss2d_scan_torch(*b).sum(), b)
    assert all(torch.equal(g, k) for g, k in zip(grads, keep))
    st.free_scan_buffers()
    with torch.no_grad():
        assert torch.equal(ss2d_scan_torch(*args1), y1)


def ss2d_core_ref(x, xw, dw, db, A_logs, Ds):
    """ss2d_core composed from the float64 oracle and the index-based cross-scan/merge."""
    bsz, H, W, D = x.shape
    N, R = A_logs.shape[1], dw.shape[2]
    xs = cross_scan(x.permute(0, 3, 1, 2))                               # (B, 4, D, L)
    proj = torch.einsum("bkdl,kcd->bkcl", xs, xw)
    dts, Bs, Cs = proj.split([R, N, N], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, dw)
    ys = selective_scan_ref(xs.reshape(bsz, 4 * D, -1), dts.reshape(bsz, 4 * D, -1), -torch.exp(A_logs),
                            Bs, Cs, Ds, db.reshape(-1), True)
    return cross_merge(ys.reshape(bsz, 4, D, -1), H, W).permute(0, 2, 3, 1)


@pytest.mark.parametrize("bsz,H,W,D,N,R", [(2, 7, 5, 6, 1, 2), (1, 9, 11, 4, 4, 3), (1, 1, 6, 3, 1, 1)])
def test_ss2d_core_grads(bsz, H, W, D, N, R):
    """Values and gradients of the model's fused path (projections, dt projection and
    softplus inside the custom backward) against the oracle."""
    g = torch.Generator().manual_seed(H * W + N)
    args = [torch.randn(bsz, H, W, D, generator=g), torch.randn(4, R + 2 * N, D, generator=g) * 0.5,
            torch.randn(4, D, R, generator=g) * 0.5, torch.randn(4, D, generator=g) * 0.3 - 1,
            torch.log(torch.rand(4 * D, N, generator=g) * 2 + 0.1), torch.randn(4 * D, generator=g)]
    check_grads(args, lambda *a: st.ss2d_core(*a, backend="torch"), ss2d_core_ref, 2e-5)


def test_ss2d_core_grads_small_blocks(monkeypatch):
    monkeypatch.setattr(st, "_BLOCK_ELEMS", 3000)
    test_ss2d_core_grads(3, 13, 11, 3, 4, 2)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_work_buffers_and_indices_serve_every_grad_mode():
    """Buffers and cached indices first made under inference_mode still work afterwards in
    no_grad, in training (forward and backward) and in a traced graph."""
    st.free_scan_buffers()
    st._SS2D_INDEX.clear()
    torch.manual_seed(0)
    model = st.VSSM(depths=[1, 1, 1, 1], dims=8, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    model.train()
    model(x).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    traced = torch.jit.trace(model, (x,), check_trace=False)
    assert rel(traced(x), ref) < 1e-5


@pytest.mark.parametrize("shift", [0.0, 25.0])
def test_softplus_log2_matches_aten(shift):
    """The eager softplus (exp2 + log1p in log2 units) equals F.softplus to float rounding
    of its argument (relative error ~6e-8 |z|, as from rounding z once more), on both
    sides of aten's threshold (20): shift 25 puts values above it, which takes the
    fallback; the returned max is the output's. Outputs stay above float32's denormals."""
    z = torch.linspace(-85, 20, 100001) + shift
    ref = torch.nn.functional.softplus(z.double())
    bound = 2e-7 * z.double().abs().clamp_min(1)
    out = torch.empty_like(z)
    zmax = st._softplus_log2(z * st._LOG2E, out)
    assert ((out.double() - ref).abs() / ref.abs() <= bound).all()
    assert abs(zmax - out.max().item()) <= 1e-6 * out.max().item()
    same = z.clone()
    assert st._softplus_(same)[0] is same  # in place
    assert ((same.double() - ref).abs() / ref.abs() <= bound).all()


@pytest.mark.parametrize("bias", [-8.0, 25.0])
def test_ss2d_core_extreme_dt(bias):
    """dt far below 1 (softplus of -8) and above softplus' threshold: inference and
    training paths against the oracle."""
    g = torch.Generator().manual_seed(5)
    D, N, R = 5, 2, 2
    args = [torch.randn(2, 6, 7, D, generator=g), torch.randn(4, R + 2 * N, D, generator=g) * 0.5,
            torch.randn(4, D, R, generator=g) * 0.5, torch.randn(4, D, generator=g) * 0.3 + bias,
            torch.log(torch.rand(4 * D, N, generator=g) * 2 + 0.1), torch.randn(4 * D, generator=g)]
    with torch.no_grad():
        assert rel(st.ss2d_core(*args, backend="torch"), ss2d_core_ref(*[a.double() for a in args])) < 2e-5
    check_grads(args, lambda *a: st.ss2d_core(*a, backend="torch"), ss2d_core_ref, 2e-5)


def test_mlp_inference_buffer_path():
    """The MLP's inference path (hidden layer in a kept buffer, GELU in place) equals the
    plain one, returns fresh tensors, and is not taken with grad or dropout in training."""
    torch.manual_seed(0)
    mlp = st.Mlp(8, 32, drop=0.5).eval()
    x = torch.randn(2, 5, 3, 8)
    with torch.no_grad():
        y1 = mlp(x)
        keep = y1.clone()
        y2 = mlp(x * 2)
        assert torch.equal(y1, keep)  # not overwritten by the next call
    ref = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x)))
    assert torch.allclose(y1, ref, atol=1e-6) and torch.allclose(y2, mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x * 2))), atol=1e-6)
    mlp.train()
    with torch.no_grad():  # dropout still applies in training mode without grad
        assert not torch.allclose(mlp(x), ref, atol=1e-6)


@pytest.mark.parametrize("cin,cout,h,w,k,s,p,bias", [(48, 96, 14, 11, 3, 2, 1, True), (40, 80, 9, 9, 2, 2, 0, False),
                                                      (24, 64, 5, 7, 3, 1, 1, True)])
def test_conv_as_matmul(cin, cout, h, w, k, s, p, bias):
    """Weight-heavy convolutions on channels-last input run as patches @ weight in eager
    inference: same values as conv2d (closer to float64 than oneDNN), a channels-last
    result, and the plain convolution with grad."""
    torch.manual_seed(0)
    conv = st._Conv2d(cin, cout, k, stride=s, padding=p, bias=bias)
    x = torch.randn(2, h, w, cin).permute(0, 3, 1, 2)
    ref = torch.nn.functional.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                                     s, p)
    with torch.no_grad():
        assert conv._as_matmul(x)
        y = conv(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel(y, ref) < 1e-6
    assert not conv._as_matmul(x)  # grad enabled: the convolution itself
    assert rel(conv(x), ref) < 1e-5


def test_inference_fast_paths_respect_hooks():
    """With forward hooks, no-grad inference neither overwrites a tensor a hook received
    nor skips a hooked module: the hooks see what they see with grad enabled."""
    torch.manual_seed(0)
    model = st.VSSM(depths=[1, 1, 1, 1], dims=8, num_classes=3, ssm_d_state=1, ssm_ratio=1.0).eval()
    blk = model.layers[0].blocks[0]
    x = torch.randn(1, 3, 32, 32)

    def run(grad):
        seen = {}
        hooks = [m.register_forward_hook(lambda mod, a, out, k=k: seen.__setitem__(k, out.clone() if grad else out))
                 for k, m in (("op", blk.op), ("mlp", blk.mlp), ("conv", blk.op.conv2d), ("fc1", blk.mlp.fc1))]
        try:
            with torch.set_grad_enabled(grad):
                out = model(x)
        finally:
            for h in hooks:
                h.remove()
        return out, seen

    out_ng, seen_ng = run(False)
    out_g, seen_g = run(True)
    assert torch.allclose(out_ng, out_g, atol=1e-5)
    assert set(seen_ng) == set(seen_g) == {"op", "mlp", "conv", "fc1"}
    for k in seen_g:
        assert torch.allclose(seen_ng[k], seen_g[k].detach(), atol=1e-5), k


def test_mlp_fast_path_only_for_plain_layers():
    """A replaced fc1 (here a Linear subclass adding 1, as adapters do) is called as a
    module in inference, not bypassed by the kept-buffer path."""
    class Shifted(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1

    torch.manual_seed(0)
    mlp = st.Mlp(8, 32).eval()
    shifted = Shifted(8, 32)
    shifted.load_state_dict(mlp.fc1.state_dict())
    mlp.fc1 = shifted
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        assert torch.allclose(mlp(x), mlp.fc2(torch.nn.functional.gelu(shifted(x))), atol=1e-6)
