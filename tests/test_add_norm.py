"""The residual add + LayerNorm kernels of the Triton path (``add_norm``: s = x + h, n = LayerNorm(s); without h, the
plain norm) against torch's LayerNorm, forward and backward, and VSSBlock / VSSM on them against the torch backend.
Under the Triton interpreter on CPU (conftest.py sets TRITON_INTERPRET=1), at tiny sizes. The interpreter rounds
float32 to bfloat16 towards zero (a GPU rounds to nearest), so bfloat16 outputs may differ from torch's by an ulp."""
import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed")
import vmamba  # noqa: E402

pytestmark = pytest.mark.triton
BF16 = torch.bfloat16


def rel(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def trained_norm(c, seed=0):
    norm = torch.nn.LayerNorm(c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # weight and bias away from 1 and 0, so that their gradients and their use are checked
        norm.weight.copy_(torch.rand(c, generator=g) + 0.5)
        norm.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return norm


def reference(x, h, s, norm):
    """float64 (s, n) through the stored s (rounded as the kernel rounded it), differentiable in x, h and norm."""
    s64 = x.double() if h is None else x.double() + h.double() + (s.double() - x.double() - h.double()).detach()
    return s64, F.layer_norm(s64, s64.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps)


# (C, rows, x's dtype, h's (None: the plain norm), n's): odd widths, rows not a multiple of BLOCK_M (16 at C = 96 and
# 100, 256 at C = 7). As the block uses it: the residual stream float32 or bfloat16, n in the activations' dtype.
F32 = torch.float32
CASES = [(96, 37, F32, F32, F32), (100, 19, F32, BF16, BF16), (7, 300, F32, BF16, BF16), (96, 37, BF16, BF16, BF16),
         (100, 19, F32, None, F32), (7, 300, F32, None, BF16), (96, 37, BF16, None, BF16)]


@pytest.mark.parametrize("c,rows,x_dtype,h_dtype,dtype", CASES)
def test_add_norm_matches_layer_norm_and_its_gradients(c, rows, x_dtype, h_dtype, dtype):
    g = torch.Generator().manual_seed(1)
    norm = trained_norm(c)
    x = (torch.randn(3, rows, c, generator=g) * 2 + 1)[:, 1:].to(x_dtype).requires_grad_()   # rows - 1 rows each
    h = None if h_dtype is None else torch.randn(x.shape, generator=g).to(h_dtype).requires_grad_()
    s, n = vmamba._add_norm(x, h, norm.weight, norm.bias, norm.eps, dtype)
    assert n.dtype == dtype and n.shape == x.shape and n.is_contiguous()
    if h is None:
        assert s.shape == (0,)
    else:   # x + h as torch rounds it
        assert s.dtype == (x + h).dtype and s.shape == x.shape and rel(s, x + h) < (1e-7 if s.dtype == F32 else 1e-2)
    s64, n64 = reference(x, h, s, norm)
    assert rel(n, n64) < (1e-6 if dtype == F32 else 1e-2)     # bfloat16: an ulp of the largest value
    # gradients: n's and, with h, s's own (its other uses); float64 reference through the rounded s
    dn = torch.randn(n.shape, generator=g).to(n.dtype)
    ds = None if h is None else torch.randn(s.shape, generator=g).to(s.dtype)
    inputs = [x] + ([] if h is None else [h]) + [norm.weight, norm.bias]
    got = torch.autograd.grad([n] + ([] if h is None else [s]), inputs, [dn] + ([] if h is None else [ds]))
    want = torch.autograd.grad([n64] + ([] if h is None else [s64]), inputs,
                               [dn.double()] + ([] if h is None else [ds.double()]))
    for name, a, b in zip(["x", "h", "weight", "bias"] if h is not None else ["x", "weight", "bias"], got, want):
        assert a.dtype == (b.dtype if name in ("weight", "bias") else dict(x=x, h=h)[name].dtype), name
        assert rel(a, b) < (1e-5 if a.dtype == torch.float32 else 1e-2), name


@pytest.mark.parametrize("has_h", [False, True])
def test_add_norm_backward_rows_per_program(has_h):
    """The backward kernel gives the same gradients with several row blocks a program (large maps) as with one; with
    h (HAS_H) the gradient of s from its other uses (ds) is added and written twice, as dx and dh."""
    kernels, norm = vmamba._triton_kernels(), trained_norm(7)
    s, dn, ds = (torch.randn(300, 7, generator=torch.Generator().manual_seed(i)) for i in range(3))
    block_m, block_c = vmamba._norm_blocks(7)                    # 256 rows a block: 2 blocks
    results = []
    for per_program in (block_m, 3 * block_m):
        programs = -(-300 // per_program)
        dx, dh, dwb = torch.empty_like(s), torch.full_like(s, 7.0), torch.empty(programs, 2, 7)
        kernels.add_norm_bwd_kernel[(programs,)](s, dn, ds, norm.weight, dx, dh, dwb, 300, 7, per_program, norm.eps,
                                                HAS_H=has_h, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4)
        results.append((dx, dh, dwb.sum(0)))
    s64 = s.double().requires_grad_()
    n64 = F.layer_norm(s64, (7,), norm.weight.double(), norm.bias.double(), norm.eps)
    want = torch.autograd.grad([n64, s64], [s64, norm.weight, norm.bias], [dn.double(), ds.double() * has_h])
    for dx, dh, dwb in results:
        assert rel(dx, want[0]) < 1e-5 and rel(dwb[0], want[1]) < 1e-5 and rel(dwb[1], want[2]) < 1e-5
        torch.testing.assert_close(dh, dx if has_h else torch.full_like(s, 7.0), rtol=0, atol=0)   # untouched


def test_add_norm_op_registrations():
    """Schema, fake (exact shapes, strides, dtypes) and autograd registration, with and without h."""
    norm = trained_norm(6)
    x = torch.randn(2, 3, 4, 6, requires_grad=True)
    h = torch.randn(2, 3, 4, 6).to(BF16).requires_grad_()
    weight, bias = norm.weight, norm.bias
    op = getattr(torch.ops, vmamba._OPS_NS).add_norm.default
    for args in ((x, h, weight, bias, 1e-5, BF16), (x, None, weight, bias, 1e-5, BF16),
                 (x.permute(0, 2, 1, 3), None, weight, bias, 1e-6, torch.float32)):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def triton_copy(module):
    """A copy whose SS2D layers and stem / downsampling norms run the Triton kernels (interpreted)."""
    fused = copy.deepcopy(module)
    for layer in fused.modules():
        if isinstance(layer, (vmamba.SS2D, vmamba.LayerNorm)):
            layer.backend = "triton"
    return fused


def counting_add_norm(monkeypatch):
    """Records (with h, n's dtype) of each call of the add_norm op."""
    calls, op = [], vmamba._add_norm
    monkeypatch.setattr(vmamba, "_add_norm", lambda *args: calls.append((args[1] is not None, args[5])) or op(*args))
    return calls


def outputs_and_grads(module, x):
    x = x.detach().requires_grad_()
    out = module(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    return out, torch.autograd.grad(out, [x, *module.parameters()], g)


def trained_block(seed=0, **kwargs):
    torch.manual_seed(seed)
    block = vmamba.VSSBlock(**dict(dict(hidden_dim=6, ssm_d_state=1, ssm_ratio=1.0), **kwargs))
    for norm in (block.norm, block.norm2, block.op.out_norm):
        if norm is not None:
            norm.load_state_dict(trained_norm(norm.weight.shape[0], seed).state_dict())
    return block


@pytest.mark.parametrize("channel_first,autocast,model_dtype", [
    (False, False, torch.float32), (True, False, torch.float32), (True, True, torch.float32), (False, False, BF16)])
def test_block_on_the_fused_norms_matches_torch(monkeypatch, channel_first, autocast, model_dtype):
    block = trained_block(channel_first=channel_first, forward_type="v0").to(model_dtype)
    fused, calls = triton_copy(block), counting_add_norm(monkeypatch)
    x = torch.randn(2, 6, 5, 3) if channel_first else torch.randn(2, 5, 3, 6)
    x = x.to(model_dtype).to(memory_format=torch.channels_last) if channel_first else x.to(model_dtype)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        ref, ref_grads = outputs_and_grads(block, x)
        out, out_grads = outputs_and_grads(fused, x)
    low = autocast or model_dtype == BF16                       # n in what in_proj and fc1 consume
    assert calls == [(False, BF16 if low else F32), (True, BF16 if low else F32)]   # norm, then add + norm2
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.stride() == ref.stride()
    assert rel(out, ref) < (3e-2 if low else 1e-5)
    names = ["x"] + [name for name, _ in block.named_parameters()]
    for name, got, want in zip(names, out_grads, ref_grads):
        assert got.dtype == want.dtype, name
        assert rel(got, want) < (6e-2 if low else 1e-4), name


@pytest.mark.parametrize("kwargs", [dict(post_norm=True), dict(mlp_ratio=0.0)])
def test_blocks_without_the_fused_norms_are_unchanged(monkeypatch, kwargs):
    """post_norm and MLP-free blocks keep torch's LayerNorm on the Triton path, as does every block on the torch one."""
    block = trained_block(**kwargs)
    fused, calls = triton_copy(block), counting_add_norm(monkeypatch)
    x = torch.randn(1, 4, 3, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block(x), rtol=1e-5, atol=1e-6)
        trained_block()(x)
    assert calls == []


@pytest.mark.parametrize("autocast", [False, True])
def test_small_vssm_on_the_fused_norms_matches_torch(monkeypatch, autocast):
    torch.manual_seed(0)
    model = vmamba.VSSM(depths=[1, 1], dims=[8, 16], num_classes=5, drop_path_rate=0.0)
    fused, calls = triton_copy(model), counting_add_norm(monkeypatch)
    x = torch.randn(2, 3, 16, 12)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        ref, ref_grads = outputs_and_grads(model, x)
        out, out_grads = outputs_and_grads(fused, x)
    act = BF16 if autocast else F32
    # the stem's two norms (the first read by a convolution), a block, the downsampling's norm, a block
    assert calls == [(False, act), (False, F32), (False, act), (True, act), (False, F32), (False, act), (True, act)]
    assert out.dtype == ref.dtype
    assert rel(out, ref) < (3e-2 if autocast else 1e-5)
    for (name, _), got, want in zip([("x", None)] + list(model.named_parameters()), out_grads, ref_grads):
        assert rel(got, want) < (6e-2 if autocast else 1e-4), name


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_stem_and_downsampling_norms_on_the_kernel(narrow, autocast):
    """vmamba.LayerNorm on the Triton path against nn.LayerNorm, gradients included: float32 out under autocast for
    the residual stream, autocast's dtype with ``narrow``; torch's LayerNorm again once moved back to "auto"."""
    norm = vmamba.LayerNorm(12, narrow=narrow)
    norm.load_state_dict(trained_norm(12).state_dict())
    fused = triton_copy(norm)
    assert norm._path == "torch" and fused._path == "triton"
    x = torch.randn(2, 5, 3, 12).to(BF16 if autocast else F32)   # under autocast: a convolution's output
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        out, out_grads = outputs_and_grads(fused, x)
    ref, ref_grads = outputs_and_grads(norm, x.float())
    assert out.dtype == (BF16 if autocast and narrow else F32) and out.is_contiguous()
    assert rel(out, ref) < (1e-2 if autocast and narrow else 1e-5)
    for got, want in zip(out_grads, ref_grads):
        assert rel(got, want) < (1e-2 if autocast else 1e-4)
    fused.backend = "auto"
    assert fused._path == "torch" and copy.deepcopy(triton_copy(norm))._path == "triton"


@pytest.mark.compile
def test_compiled_block_traces_the_fused_norms(monkeypatch):
    """fullgraph torch.compile of a block on the Triton path: the custom op's fake and autograd in the graph."""
    fused = triton_copy(trained_block(channel_first=True))
    x = torch.randn(1, 6, 4, 3).to(memory_format=torch.channels_last).requires_grad_()
    ops = []
    backend = lambda gm, example: ops.extend(str(n.target) for n in gm.graph.nodes) or gm.forward
    compiled = torch.compile(fused, fullgraph=True, backend=backend)
    out, ref = compiled(x), fused(x)
    assert sum(f"{vmamba._OPS_NS}.add_norm" in op for op in ops) == 2
    torch.testing.assert_close(out, ref)
    aot = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(torch.autograd.grad(aot.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])


def test_fx_traces_the_fused_norms_as_calls():
    """FX's symbolic tracing (timm's feature extraction) records the fused norms as calls and reproduces the block."""
    fused = triton_copy(trained_block(channel_first=True))
    x = torch.randn(1, 6, 4, 3).to(memory_format=torch.channels_last)
    traced = torch.fx.symbolic_trace(fused)
    assert traced.code.count("_fused_norm(") == 2
    with torch.no_grad():
        torch.testing.assert_close(traced(x), fused(x), rtol=0, atol=0)
