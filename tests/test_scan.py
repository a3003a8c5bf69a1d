"""The pure-PyTorch scan: values and gradients against a float64 per-step reference, and
mamba_ssm's calling convention."""
import math

import pytest
import torch

import vmamba
from vmamba import selective_scan, selective_scan_ref


def scan_torch(*args, **kwargs):
    return selective_scan(*args, backend="torch", **kwargs)


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


def softplus_scan(fast):
    return lambda u, delta, A, B, C, D, bias: fast(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True)


LENGTHS = [1, 2, 7, 15, 16, 17, 63, 64, 65, 1000, 3000]


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("N", [1, 16])
def test_selective_scan_grads(L, N):
    bsz, K = (2, 4) if L <= 1000 else (1, 1)
    D = 3 if L <= 1000 else 2
    args = make_inputs(bsz, K, D, N, L, seed=L + N)
    check_grads(list(args), softplus_scan(scan_torch), softplus_scan(selective_scan_ref), 2e-5)


@pytest.mark.parametrize("use_D,use_bias,softplus,use_z", [(False, False, True, False), (True, False, False, True),
                                                           (False, True, False, False), (True, True, True, True)])
@pytest.mark.parametrize("K,bsz", [(1, 1), (4, 2)])
def test_selective_scan_options(use_D, use_bias, softplus, use_z, K, bsz):
    u, delta, A, B, C, Dv, bias = make_inputs(bsz, K, 3, 16, 130, seed=7)
    if not softplus:
        delta = delta.abs() * 0.3  # keep dt positive without softplus
    z = torch.randn_like(u)
    args = [u, delta, A, B, C, Dv if use_D else None, z if use_z else None, bias.abs() if use_bias else None]

    def call(scan):
        return lambda *a: scan(*a, delta_softplus=softplus)

    check_grads(args, call(scan_torch), call(selective_scan_ref), 2e-5)


@pytest.mark.parametrize("N", [1, 4])
def test_last_state(N):
    u, delta, A, B, C, Dv, bias = make_inputs(2, 2, 3, N, 37, seed=3)
    y, last = scan_torch(u, delta, A, B, C, Dv, None, bias, True, True)
    yr, lr = selective_scan_ref(u, delta, A, B, C, Dv, None, bias, True, True)
    assert last.shape == (2, 6, N) and last.dtype == torch.float32
    assert rel(y, yr) < 1e-5 and rel(last, lr) < 1e-5


@pytest.mark.parametrize("N", [1, 4])
def test_strided_inputs(N):
    """Inputs that are transposed views (channels-last u, delta, z; (L, N) B and C) give the float64
    reference's values and gradients, and are left as they were."""
    u, delta, A, B, C, Dv, bias = make_inputs(2, 2, 3, N, 37, seed=11)
    u, delta, z = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (u, delta, torch.randn_like(u)))
    B, C = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (B, C))
    assert not any(t.is_contiguous() for t in (u, delta, z)) and (N == 1 or not B.is_contiguous())
    before = [t.clone() for t in (u, delta, z, B, C)]
    check_grads([u, delta, A, B, C, Dv, z, bias], lambda *a: scan_torch(*a, delta_softplus=True),
                lambda *a: selective_scan_ref(*a, delta_softplus=True), 2e-5)
    assert all(torch.equal(t, b) for t, b in zip((u, delta, z, B, C), before))


@pytest.mark.parametrize("states", [40, 100, 200])
@pytest.mark.parametrize("N", [1, 4])
def test_channel_blocks(states, N, monkeypatch):
    """Large scans run in blocks of channels (one channel each, uneven blocks) and form each
    step's decays and inputs step by step: same values, gradients and last state as the
    float64 reference, with autograd and without."""
    monkeypatch.setattr(vmamba, "_STEP_STATES", states)
    monkeypatch.setattr(vmamba, "_BLOCK_FLOATS", 4 * states)
    args = list(make_inputs(2, 2, 5, N, 45, seed=5))
    check_grads(args, softplus_scan(scan_torch), softplus_scan(selective_scan_ref), 2e-5)
    u, delta, A, B, C, Dv, bias = args
    with torch.no_grad():
        y, last = scan_torch(u, delta, A, B, C, Dv, None, bias, True, True)
    yr, lr = selective_scan_ref(u, delta, A, B, C, Dv, None, bias, True, True)
    assert rel(y, yr) < 1e-5 and rel(last, lr) < 1e-5


@pytest.mark.compile
@pytest.mark.parametrize("N", [1, 4])
def test_compiled_scan_forms_each_step_in_the_step(N, monkeypatch):
    """Compiled without autograd, a scan too large to form its decays and inputs at once forms them in each
    pass's step (at N=1 too, where eager code forms them once for both passes): the float64 reference's values
    and last state, in blocks of channels."""
    monkeypatch.setattr(vmamba, "_STEP_STATES", 100)
    monkeypatch.setattr(vmamba, "_CHUNK", 4)
    u, delta, A, B, C, Dv, bias = make_inputs(2, 2, 5, N, 45, seed=5)
    torch.compiler.reset()
    scan = torch.compile(lambda *a: scan_torch(*a, Dv, None, bias, True, True), fullgraph=True)
    with torch.no_grad():
        y, last = scan(u, delta, A, B, C)
    yr, lr = selective_scan_ref(u, delta, A, B, C, Dv, None, bias, True, True)
    assert rel(y, yr) < 1e-5 and rel(last, lr) < 1e-5
    torch.compiler.reset()


def test_mamba_conventions():
    """mamba_ssm's positional order and defaults: no softplus unless asked, B/C as
    (B, N, L) for a single group, output in u's dtype, complex A refused."""
    u, delta, A, B, C, Dv, bias = make_inputs(2, 1, 4, 3, 20, seed=5)
    delta = delta.abs()
    y = scan_torch(u, delta, A, B[:, 0], C[:, 0], Dv)  # 3-D B and C, delta used as given
    assert rel(y, selective_scan_ref(u, delta, A, B, C, Dv)) < 1e-5
    assert rel(y, selective_scan_ref(u, delta, A, B, C, Dv, delta_softplus=True)) > 1e-3
    out = scan_torch(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), Dv, return_last_state=True)
    assert out[0].dtype == torch.bfloat16 and out[1].dtype == torch.float32
    with pytest.raises(TypeError, match="complex"):
        scan_torch(u, delta, A.to(torch.complex64), B, C)
    with pytest.raises(ValueError, match=r"\(B, N, L\) or \(B, G, N, L\)"):
        scan_torch(u, delta, A, B[:, 0, :, :5], C[:, 0])
    with pytest.raises(ValueError, match="A must be"):
        scan_torch(u, delta, A[:, :2], B, C)


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
    y = scan_torch(u, delta, A, B, C, delta_softplus=True)
    assert torch.isfinite(y).all()
    assert rel(y, selective_scan_ref(u, delta, A, B, C, delta_softplus=True)) < 1e-5


def test_extreme_grads_finite():
    args = make_inputs(1, 1, 2, 16, 5000, seed=9, dt_scale=8, dt_shift=0, a_max=50)
    check_grads(list(args), softplus_scan(scan_torch), softplus_scan(selective_scan_ref), 5e-5)


def test_softplus_exact():
    """The scan's softplus compiled without autograd (exp and log only) against float64, elementwise: every float32
    sign and scale from underflow to past F.softplus's threshold, inf, -inf and nan kept, the input untouched; eager
    and with autograd, F.softplus's values and gradients."""
    mags = torch.logspace(-30, 4, 20001)   # results stay normal floats down to -87
    x = torch.cat([-mags[mags <= 87].flip(0), torch.zeros(1), mags, torch.randn(10000) * 5])
    ref, before = torch.nn.functional.softplus(x.double()), x.clone()
    special = torch.tensor([math.inf, -math.inf, math.nan])
    assert torch.equal(vmamba._softplus(x), torch.nn.functional.softplus(x))
    torch.compiler.reset()
    compiled = torch.compile(vmamba._softplus, fullgraph=True)
    y, s = compiled(x), compiled(special)
    assert y.dtype == torch.float32 and ((y.double() - ref).abs() / ref).max() < 3e-7   # F.softplus: 2.1e-7 here
    assert s[0] == math.inf and s[1] == 0 and s[2].isnan() and torch.equal(x, before)
    torch.compiler.reset()
    xg = x.clone().requires_grad_()
    yg = vmamba._softplus(xg)
    yg.sum().backward()
    assert torch.equal(yg, torch.nn.functional.softplus(x)) and torch.allclose(xg.grad, torch.sigmoid(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    u, delta, A, B, C, Dv, bias = make_inputs(1, 4, 3, 16, 200, seed=11)
    args = [t.to(dtype).requires_grad_() for t in (u, delta, A, B, C, Dv, bias)]
    y = softplus_scan(scan_torch)(*args)
    assert y.dtype == dtype
    yr = softplus_scan(selective_scan_ref)(*[t.detach() for t in args])
    assert rel(y, yr) < 1e-2  # the output is rounded to the input's dtype
    y.float().sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad.float()).all() for t in args)


@pytest.mark.parametrize("L", [1, 40])
def test_inputs_untouched(L):
    """No mode writes into the caller's tensors."""
    args = list(make_inputs(1, 1, 3, 1, L, seed=31))
    before = [t.clone() for t in args]
    for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with mode():
            y = softplus_scan(scan_torch)(*args)
        assert all(torch.equal(a, b) for a, b in zip(args, before))
        assert rel(y, softplus_scan(selective_scan_ref)(*before)) < 1e-5


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_traced_matches_eager():
    """torch.jit.trace (what the legacy ONNX exporter uses) records the same computation."""
    args = make_inputs(1, 4, 3, 2, 300, seed=22)
    fn = softplus_scan(scan_torch)
    traced = torch.jit.trace(fn, args, check_trace=False)
    assert rel(traced(*args), fn(*args)) < 1e-6


# ----------------------------------------------------------------------------
# SS2D: the model's four-direction scan
# ----------------------------------------------------------------------------
def cross_scan(x):
    """(B, C, H, W) -> (B, 4, C, L), by indexing."""
    x0 = x.flatten(2)
    x1 = x.transpose(2, 3).flatten(2)
    return torch.stack([x0, x1, x0.flip(-1), x1.flip(-1)], 1)


def cross_merge(ys, H, W):
    """(B, 4, C, L) -> (B, C, H, W)."""
    bsz, _, C, L = ys.shape
    y0 = ys[:, 0] + ys[:, 2].flip(-1)
    y1 = ys[:, 1] + ys[:, 3].flip(-1)
    return y0.view(bsz, C, H, W) + y1.view(bsz, C, W, H).transpose(2, 3)


def ss2d_core_ref(x, xw, dw, db, A_logs, Ds):
    """ss2d_core composed from the float64 oracle and the index-based cross-scan/merge."""
    bsz, H, W, D = x.shape
    N, R = A_logs.shape[1], dw.shape[2]
    xs = cross_scan(x.permute(0, 3, 1, 2))                               # (B, 4, D, L)
    proj = torch.einsum("bkdl,kcd->bkcl", xs, xw)
    dts, Bs, Cs = proj.split([R, N, N], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, dw)
    ys = selective_scan_ref(xs.reshape(bsz, 4 * D, -1), dts.reshape(bsz, 4 * D, -1), -torch.exp(A_logs),
                            Bs, Cs, Ds, delta_bias=db.reshape(-1), delta_softplus=True)
    return cross_merge(ys.reshape(bsz, 4, D, -1), H, W).permute(0, 2, 3, 1)


def ss2d_args(bsz, H, W, D, N, R, bias=-1.0):
    g = torch.Generator().manual_seed(H * W + N)
    return [torch.randn(bsz, H, W, D, generator=g), torch.randn(4, R + 2 * N, D, generator=g) * 0.5,
            torch.randn(4, D, R, generator=g) * 0.5, torch.randn(4, D, generator=g) * 0.3 + bias,
            torch.log(torch.rand(4 * D, N, generator=g) * 2 + 0.1), torch.randn(4 * D, generator=g)]


@pytest.mark.parametrize("bsz,H,W,D,N,R", [(2, 7, 5, 6, 1, 2), (1, 9, 11, 4, 4, 3), (1, 1, 6, 3, 1, 1),
                                           (1, 1, 1, 3, 16, 1), (2, 11, 13, 2, 16, 2), (1, 14, 14, 3, 1, 1)])
def test_ss2d_core_grads(bsz, H, W, D, N, R):
    check_grads(ss2d_args(bsz, H, W, D, N, R), lambda *a: vmamba.ss2d_core(*a, backend="torch"),
                ss2d_core_ref, 2e-5)


@pytest.mark.parametrize("bias", [-8.0, 25.0])
def test_ss2d_core_extreme_dt(bias):
    """dt far below 1 (softplus of -8) and above softplus' threshold."""
    args = ss2d_args(2, 6, 7, 5, 2, 2, bias=bias)
    with torch.no_grad():
        assert rel(vmamba.ss2d_core(*args, backend="torch"), ss2d_core_ref(*[a.double() for a in args])) < 2e-5
    check_grads(args, lambda *a: vmamba.ss2d_core(*a, backend="torch"), ss2d_core_ref, 2e-5)


def test_autograd_keeps_inputs_not_states():
    """N > 1 under autograd: the scan's steps are recomputed in backward, so what autograd keeps grows with the
    inputs (B, K*D, L), not with the states (B, K*D, N, L), N=16 times larger; the gradients stay exact."""
    u, delta, A, B, C, Dv, bias = make_inputs(1, 4, 32, 16, 256, seed=5)
    args = [t.requires_grad_() for t in (u, delta, A, B, C, Dv, bias)]
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        y = softplus_scan(scan_torch)(*args)
    assert sum(kept) < 8 * u.numel() * 4, (sum(kept), u.numel() * 4)   # kept states: ~4 * 16 floats per input
    y.square().sum().backward()
    grads = [t.grad.clone() for t in args]
    refs = [t.detach().clone().requires_grad_() for t in args]
    softplus_scan(selective_scan_ref)(*refs).square().sum().backward()
    for g, r in zip(grads, refs):
        assert rel(g, r.grad) < 2e-5


# ----------------------------------------------------------------------------
# Large maps in inference: the scans in tiles, each direction carrying its state
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("direction", [0, 1, 2, 3])
@pytest.mark.parametrize("bsz,H,W,D,N,R", [(2, 7, 5, 6, 1, 2), (1, 9, 11, 4, 16, 3), (1, 1, 6, 3, 1, 1),
                                           (2, 13, 4, 5, 4, 2)])
@pytest.mark.parametrize("tile_rows", [1, 2, 3, 5])
def test_ss2d_core_in_tiles_matches_the_reference(direction, bsz, H, W, D, N, R, tile_rows):
    """Tiles of rows (row-major scans, walked bottom-up when reversed) and of columns (column-major ones, right to
    left when reversed) that cut the map unevenly give the float64 reference's output, for each direction on its
    own (the other three get B = 0, so they add only the skip term) and for all four."""
    args = ss2d_args(bsz, H, W, D, N, R)
    xw = args[1].clone()
    xw[[k for k in range(4) if k != direction], R:R + N] = 0             # B of the other directions
    for case in (args[:1] + [xw] + args[2:], args):
        with torch.no_grad():
            got = vmamba.ss2d_core(*case, backend="torch", tile_rows=tile_rows)
        assert rel(got, ss2d_core_ref(*[a.double() for a in case])) < 2e-5


@pytest.mark.parametrize("N", [1, 16])
def test_ss2d_core_plans_tiles_for_a_large_map_by_itself(N):
    """Without a forced tile size a map too large for one tile is scanned in tiles (two of rows and two of columns
    at N=16, one of each at N=1): the values of the untiled path (a tile size larger than the map)."""
    args = ss2d_args(1, 160, 120, 64, N, 4)
    with torch.no_grad():
        untiled = vmamba.ss2d_core(*args, backend="torch", tile_rows=10 ** 6)
        tiled = vmamba.ss2d_core(*args, backend="torch")
    assert rel(tiled, untiled) < 1e-5


def test_ss2d_core_in_channel_blocks_under_autograd(monkeypatch):
    """Under autograd a large map keeps the untiled path, in blocks of channels (here three of two channels)."""
    monkeypatch.setattr(vmamba, "_BLOCK_FLOATS", 2 * 35 * 4 * 2)
    check_grads(ss2d_args(2, 7, 5, 6, 4, 2), lambda *a: vmamba.ss2d_core(*a, backend="torch"), ss2d_core_ref, 2e-5)
