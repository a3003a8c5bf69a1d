"""The Triton kernels against float64 references. On CPU they run under the Triton
interpreter (conftest.py sets TRITON_INTERPRET=1 before vmamba is imported); sizes are
tiny because it is slow. Select or skip them with ``-m triton`` / ``-m "not triton"``."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
import vmamba  # noqa: E402


def selective_scan_triton(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """The Triton scan's op: (y, last_state) float32 for grouped B, C (batch, G, N, L)."""
    return vmamba._selective_scan_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus)


pytestmark = pytest.mark.triton


def ref_scan(inputs, softplus=True):
    """float64 (y, last_state) of vmamba.selective_scan_ref, inputs as make_inputs gives them."""
    u, delta, A, Bs, Cs, Ds, bias = inputs
    return vmamba.selective_scan_ref(u, delta, A, Bs, Cs, Ds, delta_bias=bias, delta_softplus=softplus,
                                     return_last_state=True)


def make_inputs(Bsz, K, D, N, L, dtype, with_D, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    KD = K * D
    u = torch.randn(Bsz, KD, L, generator=g)
    delta = 0.5 * torch.randn(Bsz, KD, L, generator=g)
    # VMamba-like init: A = -(1..N) scaled, dt bias putting softplus around 0.01..1
    A = -torch.arange(1, N + 1).float().repeat(KD, 1) * (0.5 + torch.rand(KD, N, generator=g))
    Bs = torch.randn(Bsz, K, N, L, generator=g)
    Cs = torch.randn(Bsz, K, N, L, generator=g)
    Ds = torch.randn(KD, generator=g) if with_D else None
    bias = torch.log(torch.expm1(torch.rand(KD, generator=g) * 0.99 + 0.01)) if with_bias else None
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()
    return [cast(u), cast(delta), A.requires_grad_(), cast(Bs), cast(Cs),
            None if Ds is None else Ds.requires_grad_(), None if bias is None else bias.requires_grad_()]


def assert_close(got, ref, rtol, name):
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item() + 1e-12
    assert err <= rtol * scale, f"{name}: max abs err {err:.3e} > {rtol:.0e} * {scale:.3e}"


@pytest.fixture
def small_chunks(monkeypatch):
    """Force BLOCK_L = 16 so that short test sequences span several chunks (carry paths)."""
    default = vmamba._scan_blocks
    monkeypatch.setattr(vmamba, "_scan_blocks", lambda D, N, L: (*default(D, N, L)[:2], 16))


CASES = [
    # (Bsz, K, D, N, L, dtype, with_D, with_bias, softplus, small_chunks)
    (1, 4, 4, 1, 131, torch.float32, True, True, True, True),
    (1, 4, 2, 2, 32, torch.float32, True, True, True, True),  # L a multiple of BLOCK_L
    (1, 4, 3, 4, 37, torch.float32, True, True, True, True),
    (1, 4, 4, 4, 37, torch.float32, False, False, True, False),  # default tiles: 1 chunk
    (1, 4, 4, 3, 37, torch.float32, True, False, False, True),
    (1, 4, 4, 4, 37, torch.float16, True, True, True, True),
    (2, 4, 4, 1, 37, torch.bfloat16, False, True, True, True),
]


@pytest.mark.parametrize("Bsz,K,D,N,L,dtype,with_D,with_bias,softplus,chunked", CASES)
def test_selective_scan_matches_float64(Bsz, K, D, N, L, dtype, with_D, with_bias, softplus,
                                        chunked, request):
    if chunked:
        request.getfixturevalue("small_chunks")
    inputs = make_inputs(Bsz, K, D, N, L, dtype, with_D, with_bias)
    if not softplus:  # delta is used as dt directly: keep it positive
        with torch.no_grad():
            inputs[1].copy_(inputs[1].abs() * 0.2)
    y, last = selective_scan_triton(*inputs, delta_softplus=softplus)
    assert y.dtype == torch.float32 and y.shape == (Bsz, K * D, L)
    assert last.dtype == torch.float32 and last.shape == (Bsz, K * D, N) and not last.requires_grad

    ref_inputs = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    y_ref, last_ref = ref_scan(ref_inputs, softplus)
    assert_close(y, y_ref, 1e-5, "y")  # computed in float32 from the same (rounded) inputs
    assert_close(last, last_ref.detach(), 1e-5, "last_state")

    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(dy)
    y_ref.backward(dy.double())
    grad_tol = 1e-4 if dtype == torch.float32 else 1e-2  # low-precision grads are rounded
    names = ["u", "delta", "A", "B", "C", "D", "delta_bias"]
    for name, t, r in zip(names, inputs, ref_inputs):
        if t is None:
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype, name
        assert_close(t.grad, r.grad, grad_tol, f"grad {name}")


def test_selective_scan_strong_decay_no_nan(small_chunks):
    """dt*A down to about -300: decays underflow to 0, gradients must stay finite and exact."""
    inputs = make_inputs(1, 4, 2, 4, 21, torch.float32, True, True, seed=3)
    with torch.no_grad():
        inputs[1].mul_(20.0)  # large positive delta -> dt up to ~30
    y, last = selective_scan_triton(*inputs, delta_softplus=True)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y_ref, last_ref = ref_scan(ref_inputs)
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(last, last_ref.detach(), 1e-5, "last_state")
    y.sum().backward()
    y_ref.sum().backward()
    for name, t, r in zip(["u", "delta", "A", "B", "C", "D", "delta_bias"], inputs, ref_inputs):
        assert torch.isfinite(t.grad).all(), name
        assert_close(t.grad, r.grad, 1e-4, f"grad {name}")


def test_selective_scan_compiles_without_graph_break():
    inputs = make_inputs(1, 4, 2, 2, 9, torch.float32, True, True)

    def f(u, delta, A, B, C, D, bias):
        y, last = selective_scan_triton(u, delta, A, B, C, D, bias, delta_softplus=True)
        return y.sum() + last.sum()

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*inputs)
    out.backward()
    grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    f(*inputs).backward()
    torch.testing.assert_close(out, f(*inputs))
    for g, t in zip(grads, inputs):
        torch.testing.assert_close(g, t.grad)


def test_custom_op_registrations():
    """Schema, fake (meta) implementations and autograd registration of the scan ops."""
    ops = getattr(torch.ops, vmamba._OPS_NS)
    u, delta, A, Bs, Cs, Ds, bias = make_inputs(1, 4, 2, 2, 9, torch.float32, True, True)
    y, states = ops.selective_scan_fwd(u, delta, A, Bs, Cs, Ds, bias, True)
    assert states.shape == (1, 8, 2)  # the last state
    calls = [
        (ops.selective_scan_fwd, (u, delta, A, Bs, Cs, Ds, bias, True)),
        (ops.selective_scan_fwd, (u, delta, A, Bs, Cs, None, None, False)),
        # transposed views in (the old SS2D layout): the outputs, and the fakes' strides that inductor asserts,
        # are contiguous
        (ops.selective_scan_fwd, (*[t.detach().mT.contiguous().mT for t in (u, delta)], A.detach(),
                                  *[t.detach().permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1) for t in (Bs, Cs)],
                                  None, None, True)),
    ]
    for op, args in calls:
        torch.library.opcheck(op.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_public_api_and_model_use_triton():
    """selective_scan(backend="triton") and a whole SS2D layer (its fused path) agree with the torch backend."""
    u, delta, A, Bs, Cs, Ds, bias = make_inputs(1, 4, 3, 2, 23, torch.float32, True, True)
    z = torch.randn_like(u)
    kw = dict(D=Ds, z=z, delta_bias=bias, delta_softplus=True)
    with torch.no_grad():
        got, last = vmamba.selective_scan(u, delta, A, Bs, Cs, **kw, return_last_state=True, backend="triton")
        ref = vmamba.selective_scan(u, delta, A, Bs, Cs, **kw, backend="torch")
        y_ref, last_ref = vmamba.selective_scan_ref(u, delta, A, Bs, Cs, **kw, return_last_state=True)
    assert_close(got, ref.double(), 1e-5, "y")
    assert_close(got, y_ref, 1e-5, "y vs ref")
    assert_close(last, last_ref, 1e-5, "last_state")
    layer = vmamba.SS2D(d_model=8, d_state=2, ssm_ratio=1.0, forward_type="v05_noz").eval()
    x = torch.randn(1, 3, 5, 8)
    with torch.no_grad():
        ref = layer(x)
        layer.backend = "triton"
        got = layer(x)
    assert_close(got, ref.double(), 1e-5, "SS2D")


@pytest.mark.compile
def test_inductor_compiled_training_step_with_triton():
    """A mixed-precision training step of a model compiled by inductor with the Triton ops, as
    on a GPU: inductor asserts each custom op's output strides against its fake implementation.
    Compiled with a symbolic batch (dynamic=True), the case a GPU run once failed to compile (there
    the batch had become dynamic after two sizes); batches 2 and 3 run the one graph. Each step
    against eager."""
    torch.manual_seed(0)
    model = vmamba.vmamba_tiny_s1l8(depths=[1, 1], dims=[4, 4], num_classes=5, drop_path_rate=0.0)   # no RNG
    params = list(model.parameters())
    torch.compiler.reset()
    vmamba.set_backend("triton")
    try:
        compiled = torch.compile(model, fullgraph=True, dynamic=True)
        for b in (2, 3):
            x, steps = torch.randn(b, 3, 16, 16), []   # stage maps 4 x 4 and 2 x 2
            for m in (model, compiled):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = m(x).float().square().sum()
                steps.append((loss, torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])))
            (loss_ref, ref), (loss, got) = steps
            assert_close(loss, loss_ref.double(), 2e-2, f"loss at batch {b}")
            # bf16 rounding differs where inductor fuses: compare all gradients against their largest.
            assert_close(got, ref.double(), 2e-2, f"gradients at batch {b}")
    finally:
        vmamba.set_backend(None)
        torch.compiler.reset()
