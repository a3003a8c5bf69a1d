"""SS2D's fused Triton path (the scan reading the map in place, its D term included, then one kernel for the merge,
out_norm and the gate) against the torch backend, under the Triton interpreter on CPU (conftest.py sets
TRITON_INTERPRET=1); and where a layer's scan path is decided (construction, moves, set_backend), never in
forward. Sizes are tiny: the interpreter runs the sequential scan a step at a time."""
import copy
import pickle
import sys

import pytest
import torch

import vmamba


def rel(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def layer_pair(forward_type, d_state, d_model=4, dt_rank="auto", seed=0):
    torch.manual_seed(seed)
    layer = vmamba.SS2D(d_model=d_model, d_state=d_state, ssm_ratio=1.0, dt_rank=dt_rank, forward_type=forward_type)
    with torch.no_grad():  # a trained-looking norm and skip, so that their gradients are checked
        layer.out_norm.weight.uniform_(0.5, 1.5)
        layer.out_norm.bias.uniform_(-0.5, 0.5)
        layer.Ds.uniform_(0.5, 1.5)
    fused = copy.deepcopy(layer)
    fused.backend = "triton"
    assert layer._path == "torch" and fused._path == "triton"
    return layer, fused


def outputs_and_grads(layer, x, grads):
    x = x.detach().requires_grad_(grads)
    out = layer(x)
    if not grads:
        return out, []
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return out, torch.autograd.grad(out, [x, *layer.parameters()], g)


# (forward type, N, dtype, H, W, gradients, d_model, dt_rank): both families (v0 gated N=16, v05_noz N=1), odd
# maps, maps over several of the backward's segments of 32 steps; 96 channels (3 blocks of 32); rank 40 (dt from a
# GEMM) and rank 12 at N = 16 (dt made inside forward, a GEMM backward).
CASES = [
    ("v05_noz", 1, torch.float32, 7, 9, True, 4, "auto"),
    ("v0", 16, torch.float32, 7, 9, True, 4, "auto"),
    ("v05_noz", 1, torch.bfloat16, 7, 9, True, 4, "auto"),
    ("v0", 16, torch.bfloat16, 9, 7, False, 4, "auto"),
    ("v05_noz", 1, torch.float32, 1, 5, True, 4, "auto"),
    ("v0", 1, torch.float32, 3, 5, True, 96, "auto"),
    ("v05_noz", 4, torch.float32, 9, 11, True, 4, 40),
    ("v0", 16, torch.bfloat16, 3, 5, True, 4, 12),
]


@pytest.mark.triton
@pytest.mark.parametrize("forward_type,N,dtype,H,W,grads,d_model,dt_rank", CASES)
def test_fused_ss2d_matches_torch(forward_type, N, dtype, H, W, grads, d_model, dt_rank):
    layer, fused = layer_pair(forward_type, N, d_model, dt_rank)
    x = torch.randn(2 if d_model < 16 else 1, H, W, d_model)
    tol = 1e-5 if dtype == torch.float32 else 3e-2   # bfloat16: every direction's y is rounded before the merge
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
        ref, ref_grads = outputs_and_grads(layer, x, grads)
        out, out_grads = outputs_and_grads(fused, x, grads)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel(out, ref) < tol
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, got, want in zip(names, out_grads, ref_grads):
        assert got.dtype == want.dtype, name
        assert rel(got, want) < (1e-4 if dtype == torch.float32 else 5e-2), name


def ss2d_scan_ref(x, proj, w_dt, bias, A_logs, Ds):
    """ss2d_scan through the float64 oracle: the four sequences, dt = w_dt @ dts, outputs back on their pixels."""
    (b, h, w, d), r, n = x.shape, w_dt.shape[2], A_logs.shape[1]
    dts, Bs, Cs = vmamba._to_sequences(proj.double()).split([r, n, n], -1)   # (B, L, 4, R|N|N)
    u = vmamba._to_sequences(x.double()).permute(0, 2, 3, 1).flatten(1, 2)    # (B, 4*D, L)
    delta = torch.einsum("blkr,kdr->bkdl", dts, w_dt.double()).flatten(1, 2)
    y = vmamba.selective_scan_ref(u, delta, -torch.exp(A_logs.double()), Bs.permute(0, 2, 3, 1), Cs.permute(0, 2, 3, 1),
                                  Ds.double(), delta_bias=bias.flatten(), delta_softplus=True).view(b, 4, d, -1)
    pixel = vmamba._to_sequences(torch.arange(h * w).view(1, h, w, 1))[0, :, :, 0]   # (L, 4): step -> pixel
    return torch.stack([y[:, k][..., pixel[:, k].argsort()].transpose(1, 2) for k in range(4)], 2).view(b, h, w, 4, d)


# (batch, H, W, D, N, R, dtype, dy over directions), segments of 4 steps here (32 in use): one segment; two, the last
# partial (N = 16, rank 12: dt made inside forward, a GEMM backward); exactly three, 3 channel blocks; four (rank 40:
# dt from a GEMM both ways); bfloat16; a gradient broadcast over the directions (stride 0, as the merge gives it).
BWD_CASES = [
    (2, 1, 3, 4, 1, 2, torch.float32, False),
    (1, 2, 3, 4, 16, 12, torch.float32, False),
    (1, 3, 4, 96, 1, 6, torch.float32, False),
    (1, 4, 4, 8, 4, 40, torch.float32, True),
    (1, 3, 5, 4, 1, 6, torch.bfloat16, True),
]


@pytest.mark.triton
@pytest.mark.parametrize("batch,H,W,D,N,R,dtype,broadcast", BWD_CASES)
def test_fused_scan_backward_matches_float64(batch, H, W, D, N, R, dtype, broadcast, monkeypatch):
    """Every input's gradient from the fused backward against autograd through the float64 oracle."""
    monkeypatch.setattr(vmamba, "_SS2D_SEGMENT", 4)   # segments of 4 steps: several of them on tiny maps
    torch.manual_seed(0)
    inputs = [torch.randn(batch, H, W, D).to(dtype), torch.randn(batch, H, W, 4, R + 2 * N).to(dtype),
              (torch.randn(4, D, R) / R ** 0.5).to(dtype), torch.randn(4, D), torch.randn(4 * D, N) / 2,
              torch.rand(4 * D) + 0.5]
    inputs = [t.requires_grad_() for t in inputs]
    dys = torch.randn(batch, H, W, 1 if broadcast else 4, D).to(dtype).expand(batch, H, W, 4, D)
    got = torch.autograd.grad(vmamba._ss2d_scan(*inputs, True)[0], inputs, dys)
    want = torch.autograd.grad(ss2d_scan_ref(*inputs), inputs, dys.double())
    for name, g, ref in zip(("x", "proj", "w_dt", "bias", "A_logs", "Ds"), got, want):
        assert g.dtype == ref.dtype and g.shape == ref.shape, name
        assert rel(g, ref) < (1e-5 if dtype == torch.float32 else 2e-2), name


@pytest.mark.triton
@pytest.mark.slow
def test_fused_ss2d_long_odd_map():
    """33 x 97 pixels: every direction crosses many row and column ends (about a minute interpreted)."""
    layer, fused = layer_pair("v05_noz", 1, d_model=2)
    x = torch.randn(1, 33, 97, 2)
    with torch.no_grad():
        assert rel(fused(x), layer(x)) < 1e-5


@pytest.mark.triton
def test_ss2d_core_triton_with_dt_from_a_gemm():
    """Ranks above 32 take dt from a channels-last GEMM, not from the kernel; ss2d_core itself (no norm)."""
    args = [torch.randn(1, 3, 5, 4)] + [p.detach() for p in layer_pair("v05_noz", 2, dt_rank=40)[0].parameters()][:5]
    assert vmamba._ss2d_blocks(4, 2, 40)[2] == 0 and vmamba._ss2d_blocks(4, 2, 12)[2] == 16
    x, w_proj, A_logs, Ds, w_dt, b_dt = args
    ref = vmamba.ss2d_core(x, w_proj, w_dt, b_dt, A_logs, Ds, backend="torch")
    assert rel(vmamba.ss2d_core(x, w_proj, w_dt, b_dt, A_logs, Ds, backend="triton"), ref) < 1e-5


@pytest.mark.triton
def test_fused_scan_finite_under_strong_decay():
    """dt up to ~50 (decays exp(dt * A) underflow to 0): the sequential recurrence stays finite and exact."""
    layer, fused = layer_pair("v05_noz", 4)
    with torch.no_grad():
        for m in (layer, fused):
            m.dt_projs_bias.fill_(50.0)
        x = torch.randn(1, 5, 3, 4) * 10
        out, ref = fused(x), layer(x)
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-5


def merge_norm_reference(ys, z, weight, bias, eps):
    """_merge_norm's math in float64: LayerNorm(ys.sum(-2)) * silu(z), ys (..., 4, D)."""
    m = ys.double().sum(-2)
    y = torch.nn.functional.layer_norm(m, m.shape[-1:], weight.double(), bias.double(), eps)
    return y if z is None else y * torch.nn.functional.silu(z.double())


# (D, (B, H, W), dtype): rows not a multiple of BLOCK_M (512 at D = 4, 256 at D = 7, 16 at D = 96: 3 programs)
MERGE_NORM_CASES = [(d, shape, dtype) for d, shape in ((4, (2, 5, 7)), (7, (1, 3, 5)), (96, (2, 3, 7)))
                    for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.triton
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("D,shape,dtype", MERGE_NORM_CASES)
def test_merge_norm_gradients_match_float64(D, shape, dtype, gated):
    """The merge_norm op's backward (the add_norm kernel on the merged map the forward kept; every input's gradient)
    against float64 autograd of the same math; z a strided view, as SS2D's gate is."""
    g = torch.Generator().manual_seed(D)
    ys = (torch.randn(*shape, 4, D, generator=g) + 0.5).to(dtype).requires_grad_()
    z = torch.randn(*shape, 2 * D, generator=g).to(dtype).chunk(2, -1)[1].requires_grad_() if gated else None
    weight, bias = ((torch.rand(D, generator=g) + s).to(dtype).requires_grad_() for s in (0.5, -0.5))
    out = vmamba._merge_norm(ys, z, weight, bias, 1e-5, True)[0]
    assert out.shape == (*shape, D) and out.dtype == dtype
    dout = torch.randn(out.shape, generator=g).to(dtype)
    inputs = [t for t in (ys, z, weight, bias) if t is not None]
    got = torch.autograd.grad(out, inputs, dout)
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    args = leaves[:1] + ([leaves[1]] if gated else [None]) + leaves[1 + gated:]
    want = torch.autograd.grad(merge_norm_reference(*args, 1e-5), leaves, dout.double())
    names = ["ys"] + (["z"] if gated else []) + ["weight", "bias"]
    assert got[0].stride(3) == 0   # one gradient for the four directions, read in place by the scan's backward
    for name, t, a, b in zip(names, inputs, got, want):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        assert rel(a, b) < (1e-5 if a.dtype == torch.float32 else 1e-2), name
    with pytest.raises(RuntimeError, match="save=True"):   # inference keeps no merged map: no backward
        torch.autograd.grad(vmamba._merge_norm(ys, z, weight, bias, 1e-5, False)[0], inputs, dout)


@pytest.mark.triton
def test_fused_ops_registrations_and_compile():
    """Schemas, fake (meta) implementations and autograd of the fused ops; a fullgraph compile of a layer on them."""
    ops = getattr(torch.ops, vmamba._OPS_NS)
    x = torch.randn(1, 3, 2, 4, requires_grad=True)
    proj = torch.randn(1, 3, 2, 4, 2 + 2 * 2, requires_grad=True)
    w_dt, bias = torch.randn(4, 4, 2, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    A_logs, Ds = torch.randn(16, 2, requires_grad=True), torch.rand(16, requires_grad=True)
    ys, ckpt = ops.ss2d_scan(x, proj, w_dt, bias, A_logs, Ds, True)
    assert ys.shape == (1, 3, 2, 4, 4) and ys.is_contiguous() and ckpt.shape == (4, 1, 2, 32)   # (programs, L/32, N, BD)
    with pytest.raises(RuntimeError, match="save=True"):   # inference keeps no states: no backward
        torch.autograd.grad(ops.ss2d_scan(x, proj, w_dt, bias, A_logs, Ds, False)[0].sum(), x)
    z = torch.randn(1, 3, 2, 8).chunk(2, -1)[1].requires_grad_()   # a strided view, as SS2D's gate is
    w, b = torch.rand(4, requires_grad=True), torch.rand(4, requires_grad=True)
    for op, args in ((ops.ss2d_scan, (x, proj, w_dt, bias, A_logs, Ds, True)),
                     (ops.merge_norm, (ys.detach(), z, w, b, 1e-5, True)),
                     (ops.merge_norm, (ys.detach(), None, w, b, 1e-5, True))):
        torch.library.opcheck(op.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    inputs = [t.detach() for t in (x, proj, w_dt, bias, A_logs, Ds, ckpt)]
    for dys in (torch.randn(1, 3, 2, 4, 4), torch.randn(1, 3, 2, 1, 4).expand(1, 3, 2, 4, 4)):   # the backward's op
        torch.library.opcheck(ops.ss2d_scan_bwd.default, (dys, *inputs), test_utils=("test_schema", "test_faketensor"))
    _, fused = layer_pair("v0", 2)
    x = torch.randn(1, 3, 5, 4, requires_grad=True)
    out = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
    ref = fused(x)
    torch.testing.assert_close(out, ref)
    g_compiled, = torch.autograd.grad(out.sum(), x)
    g_eager, = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g_compiled, g_eager)


# --- Where the scan path is decided (no Triton kernel runs here).

def test_scan_path_is_decided_at_build_move_and_set_backend(monkeypatch):
    layer = vmamba.SS2D(d_model=4, d_state=1, ssm_ratio=1.0)
    assert layer.backend == "auto" and layer._path == "torch"      # CPU: the torch scan
    try:
        vmamba.set_backend("triton")                                # interpreted here (TRITON_INTERPRET=1)
        copied = pickle.loads(pickle.dumps(layer))
        assert layer._path == "triton" and copy.deepcopy(layer)._path == "triton"
        vmamba.set_backend("torch")
        assert layer._path == copied._path == "torch"
    finally:
        vmamba.set_backend(None)
    layer.backend = "triton"
    assert layer._path == "triton"
    vmamba._triton_kernels.cache_clear()
    monkeypatch.delenv("TRITON_INTERPRET")                          # a move decides again: triton cannot run here
    layer.float()
    assert layer._path is None
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        layer(torch.randn(1, 2, 2, 4))
    assert vmamba._triton_kernels.cache_info().currsize == 0        # none defined here, to stay uninterpreted
    layer.backend = "torch"
    assert layer._path == "torch" and layer(torch.randn(1, 2, 2, 4)).shape == (1, 2, 2, 4)
    with pytest.raises(ValueError, match="unknown backend"):
        layer.backend = "fast"


def test_forward_reads_no_environment_and_fx_traces_without_leaves(monkeypatch):
    layer = vmamba.SS2D(d_model=4, d_state=2, ssm_ratio=1.0, forward_type="v0").eval()
    x = torch.randn(1, 3, 5, 4)
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(vmamba.os, "environ", None)                   # any lookup in forward would fail
        ref = layer(x)
    traced = torch.fx.symbolic_trace(layer)                         # no leaf registration needed
    with torch.no_grad():
        assert torch.equal(traced(x), ref)
    assert "ss2d_core" in traced.code


def test_import_adds_little_and_no_triton():
    code = ("import sys, time; import torch; t = time.perf_counter(); import vmamba; "
            "print(time.perf_counter() - t, 'triton' in sys.modules)")
    import subprocess
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(vmamba.__file__).rsplit("/", 1)[0]).stdout.split()
    assert out[1] == "False" and float(out[0]) < 0.3
