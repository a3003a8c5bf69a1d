"""Inputs a careful user would not pass, and what each gets: growth instead of decay (dt*A > 0),
integer, bool and complex tensors, empty dimensions, mamba_ssm's constant B and C, bad constructor
arguments and an image in another dtype than the model. Every case asserts the promise (the values
of the float64 reference, the exact error class and what its message names), not only that
something happened. Triton cases run under the interpreter at tiny sizes."""
import pytest
import torch

import vmamba
from vmamba import selective_scan, selective_scan_ref

F32_MAX = torch.finfo(torch.float32).max
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.fixture
def backend(request):
    if request.param == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    return request.param


def rel(got, ref):
    """Max abs error relative to the reference's max magnitude."""
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make(b=1, g=2, d=3, n=4, L=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u, delta = torch.randn(b, g * d, L, generator=gen), torch.randn(b, g * d, L, generator=gen)
    A = -torch.rand(g * d, n, generator=gen) - 0.1
    B, C = torch.randn(b, g, n, L, generator=gen), torch.randn(b, g, n, L, generator=gen)
    return [u, delta, A, B, C, torch.randn(g * d, generator=gen)]


# --- Growth: dt*A > 0 --------------------------------------------------------------------------
def growth_cases():
    """(name, args, kwargs): each reference fits float32, while products of decays over a chunk,
    a Triton tile or the whole sequence overflow it (the chunked scan used to give inf * 0 = NaN)."""
    cases = []
    u, delta, A, B, C, D = make(L=300, seed=1)
    # positive A with softplus: slow growth over the whole sequence, inputs only in the last fifth
    u0 = u.clone()
    u0[..., :240] = 0
    cases.append(("positive A, late inputs", [u0, delta, A.abs() * 0.6, B, C, D], dict(delta_softplus=True)))
    # negative delta without softplus: dt*A > 0 at random steps, a random walk of growth and decay
    cases.append(("negative delta", [u, delta * 2, A * 0.2, B, C, D], {}))
    # the first step grows by e^200: it multiplies the zero initial state, nothing else
    first = delta.abs() * 0.3
    first[..., 0] = -200.0
    cases.append(("huge first step", [u, first, A.clamp(max=-1.0), B, C, D], {}))
    # a zero state (no inputs yet), then one step in mid-chunk grows by e^200 or more: 0 * e^200 is 0
    u2, mid = u.clone(), delta.abs() * 0.3
    u2[..., :37], mid[..., 37] = 0, -200.0
    cases.append(("huge step on a zero state", [u2, mid, A.clamp(max=-1.0), B, C, D], {}))
    # growth of 2 per step, no input for 280 steps: e^560 in every product that spans them
    u1 = u.clone()
    u1[..., :280] = 0
    cases.append(("steady growth, zero inputs", [u1, torch.ones_like(delta), torch.full_like(A, 2.0), B, C, None], {}))
    return cases


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", growth_cases(), ids=lambda c: c[0])
def test_growth_is_finite_and_exact(case, backend, monkeypatch):
    """Finite and within 1e-5 of the float64 reference wherever that fits float32, in both backends;
    Triton in its own tiles (128 steps here: products within a tile overflow) and in tiles of 16 steps
    (states cross tiles)."""
    name, args, kwargs = case
    ref, ref_last = selective_scan_ref(*args, **kwargs, return_last_state=True)
    assert ref.abs().max() < F32_MAX and ref_last.abs().max() < F32_MAX, "the case must fit float32"
    default = vmamba._scan_blocks
    for tile in [None] + ([16] if backend == "triton" else []):
        if tile:
            monkeypatch.setattr(vmamba, "_scan_blocks", lambda D, N, L: (*default(D, N, L)[:2], tile))
        y, last = selective_scan(*args, **kwargs, return_last_state=True, backend=backend)
        assert y.isfinite().all() and last.isfinite().all(), (name, tile)
        assert rel(y, ref) < 1e-5 and rel(last, ref_last) < 1e-5, (name, tile, rel(y, ref), rel(last, ref_last))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_growth_without_overflow_has_exact_gradients(backend):
    """Moderate growth (every product fits float32): gradients are the reference's."""
    u, delta, A, B, C, D = make(L=70, seed=4)
    args = [u, delta, A.abs() * 0.3, B, C, D]
    a32 = [t.clone().requires_grad_() for t in args]
    a64 = [t.double().requires_grad_() for t in args]
    y, ref = selective_scan(*a32, delta_softplus=True, backend=backend), selective_scan_ref(*a64, delta_softplus=True)
    assert rel(y, ref) < 1e-5
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for got, want in zip(torch.autograd.grad(y, a32, g.float()), torch.autograd.grad(ref, a64, g)):
        assert got.isfinite().all() and rel(got, want) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_growth_beyond_float32_overflows_without_nan(backend):
    """Where the reference's states do not fit float32 they overflow to inf of the right sign, not NaN (here
    every input is positive, so every state ends at +inf)."""
    L = 400
    args = [torch.ones(1, 2, L), torch.ones(1, 2, L), torch.full((2, 3), 0.5), torch.ones(1, 1, 3, L),
            torch.ones(1, 1, 3, L)]
    y, last = selective_scan(*args, return_last_state=True, backend=backend)
    assert not y.isnan().any() and (last == float("inf")).all()


# --- Dtypes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("position", range(6))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_non_float_inputs_are_a_type_error(dtype, position, backend):
    """Integer and bool tensors would be truncated, complex ones lose their imaginary part: TypeError naming
    the argument, before any backend runs."""
    args = make()
    args[position] = args[position].to(dtype)
    name = ("u", "delta", "A", "B", "C", "D")[position]
    with pytest.raises(TypeError, match=rf"{name} must be a real floating-point tensor, got {dtype}"):
        selective_scan(*args, backend=backend)


@pytest.mark.parametrize("keyword", ["z", "delta_bias"])
def test_non_float_keyword_inputs_are_a_type_error(keyword):
    u = make()[0]
    bad = torch.ones_like(u, dtype=torch.int64) if keyword == "z" else torch.ones(u.shape[1], dtype=torch.bool)
    with pytest.raises(TypeError, match=f"{keyword} must be a real floating-point tensor"):
        selective_scan(*make(), **{keyword: bad}, backend="torch")


# --- Empty dimensions -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 2, 3, 4, 5), (2, 2, 3, 4, 0), (2, 2, 0, 4, 5), (2, 2, 3, 0, 5), (0, 1, 0, 0, 0)],
                         ids=["batch", "length", "channels", "state", "all"])
def test_empty_dimensions_give_empty_outputs_alike(shape):
    """batch 0, L 0, D 0 or N 0: outputs of the right shapes, zero states, y = (D * u) * silu(z) (the only
    term left), the same in every backend (Triton under the interpreter)."""
    b, g, d, n, L = shape
    u, delta, z = torch.randn(b, g * d, L), torch.randn(b, g * d, L), torch.randn(b, g * d, L)
    A, B, C, D = -torch.rand(g * d, n), torch.randn(b, g, n, L), torch.randn(b, g, n, L), torch.randn(g * d)
    backends = ["torch"] + (["triton"] if vmamba._triton_usable(u.device) else [])
    for backend in backends:
        y, last = selective_scan(u, delta, A, B, C, D, z, None, True, True, backend=backend)
        assert y.shape == (b, g * d, L) and last.shape == (b, g * d, n) and last.dtype == torch.float32
        assert torch.equal(last, torch.zeros_like(last))
        assert torch.allclose(y, u * D[:, None] * torch.nn.functional.silu(z))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_zero_groups_is_one_value_error(backend):
    u, delta, A = torch.randn(1, 0, 5), torch.randn(1, 0, 5), torch.randn(0, 4)
    B = C = torch.randn(1, 0, 4, 5)
    with pytest.raises(ValueError, match=r"G >= 1 dividing G\*D=0"):
        selective_scan(u, delta, A, B, C, backend=backend)


# --- mamba_ssm's constant B and C, (G*D, N) ------------------------------------------------------
def constant_bc_cases():
    u, delta, A, B, C, D = make(b=2, g=2, d=3, n=4, L=37, seed=6)
    Bc, Cc = torch.randn(6, 4), torch.randn(6, 4)
    return [("B constant", Bc, C), ("C constant", B, Cc), ("both constant", Bc, Cc),
            ("constant B, ungrouped C", Bc, C[:, 0]), ("groups 2 and 1", B, C[:, :1])]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", constant_bc_cases(), ids=lambda c: c[0])
def test_constant_b_and_c_as_mamba(case, backend):
    """As mamba_ssm's selective_scan_fn: B or C of shape (G*D, N) is the same for every step, one per
    channel; B and C may have different layouts. Values, last state and every gradient match the float64
    reference."""
    _, B, C = case
    u, delta, A, _, _, D = make(b=2, g=2, d=3, n=4, L=37, seed=6)
    args = [u, delta, A, B, C, D]
    a32 = [t.clone().requires_grad_() for t in args]
    a64 = [t.double().requires_grad_() for t in args]
    y, last = selective_scan(*a32, delta_softplus=True, return_last_state=True, backend=backend)
    ref, ref_last = selective_scan_ref(*a64, delta_softplus=True, return_last_state=True)
    assert rel(y, ref) < 1e-5 and rel(last, ref_last) < 1e-5
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for got, want in zip(torch.autograd.grad(y, a32, g.float()), torch.autograd.grad(ref, a64, g)):
        assert got.shape == want.shape and rel(got, want) < 1e-4


def test_constant_b_of_the_wrong_shape_names_the_layouts():
    u, delta, A, B, C, D = make()
    with pytest.raises(ValueError, match=r"constant \(G\*D, N\) = \(6, N\), got \(4, 6\)"):
        selective_scan(u, delta, A, torch.randn(4, 6), C, backend="torch")


# --- Constructors: every argument checked when the model is built --------------------------------
TINY = dict(depths=[1, 1], dims=8, num_classes=3)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(ssm_conv=2), ValueError, r"ssm_conv must be odd .*, got 2"),   # built, then failed at forward
    (dict(ssm_conv=0), ValueError, r"ssm_conv must be an integer >= 1, got 0"),
    (dict(dims=16.0), TypeError, r"dims must be an integer \(the first stage's width\) or one per stage, got 16.0"),
    (dict(dims="16"), TypeError, r"dims must be an integer .* got '16'"),
    (dict(dims=[8, 16.0]), TypeError, r"dims\[1\] must be an integer >= 1, got 16.0 \(float\)"),
    (dict(dims=True), TypeError, r"dims must be an integer"),
    (dict(depths=4), TypeError, r"depths must be a sequence of block counts, one per stage, got 4"),
    (dict(depths="11"), TypeError, r"depths must be a sequence"),
    (dict(depths=[1, 1.0]), TypeError, r"depths\[1\] must be an integer >= 1, got 1.0"),
    (dict(depths=[10 ** 7, 1]), ValueError, r"depths=\[10000000, 1\] with dims=\[8, 16\] give 10000001 blocks"),
    (dict(dims=[2 ** 14, 2 ** 15]), ValueError, r"about 1.\de\+10 weights; at most 1024 blocks and 2\*\*33"),
    (dict(num_classes=2 ** 31), ValueError, r"2\*\*33 weights"),
    (dict(check_finite="no"), ValueError, r"check_finite='no' is not supported; expected one of \[False, True\]"),
    (dict(use_checkpoint="yes"), ValueError, r"use_checkpoint='yes'"),
    (dict(ssm_conv_bias=None), ValueError, r"ssm_conv_bias=None"),
    (dict(imgsize=0), ValueError, r"imgsize must be an integer >= 1, got 0"),
    (dict(dtype=torch.int64), TypeError, r"dtype must be a floating-point torch.dtype or None, got torch.int64"),
    (dict(dtype="float16"), TypeError, r"dtype must be a floating-point torch.dtype"),
    (dict(ssm_ratio="2"), TypeError, r"ssm_ratio must be a number > 0, got '2' \(str\)"),
    (dict(ssm_ratio=float("inf")), ValueError, r"ssm_ratio must be a number > 0, got inf"),
    (dict(mlp_ratio=float("nan")), ValueError, r"mlp_ratio must be a number >= 0, got nan"),
    (dict(drop_path_rate=None), TypeError, r"drop_path_rate must be a number >= 0 and < 1, got None"),
    (dict(num_classes=True), TypeError, r"num_classes must be an integer >= 0, got True \(bool\)"),
    (dict(in_chans=3.0), TypeError, r"in_chans must be an integer >= 1, got 3.0"),
    (dict(ssm_dt_rank="4"), TypeError, r"ssm_dt_rank must be an integer >= 1, got '4'"),
    (dict(ssm_d_state=1.5), TypeError, r"ssm_d_state must be an integer >= 1"),
    (dict(ssm_drop_rate=1.0), ValueError, r"ssm_drop_rate must be a number >= 0 and < 1, got 1.0"),
    (dict(mlp_drop_rate=-0.1), ValueError, r"mlp_drop_rate must be a number >= 0 and < 1"),
    (dict(gmlp=True), ValueError, r"gmlp=True is not supported"),
])
def test_bad_vssm_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        vmamba.VSSM(**dict(TINY, **kwargs))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dt_min=0), ValueError, r"dt_min must be a number > 0, got 0"),
    (dict(dt_min=0.1, dt_max=0.01), ValueError, r"dt_max must be a number >= 0.1, got 0.01"),
    (dict(dt_max="0.1"), TypeError, r"dt_max must be a number"),
    (dict(dt_scale=-1.0), ValueError, r"dt_scale must be a number >= 0, got -1.0"),
    (dict(dt_init_floor=float("nan")), ValueError, r"dt_init_floor must be a number >= 0, got nan"),
    (dict(bias="no"), ValueError, r"bias='no' is not supported; expected one of \[False, True\]"),
    (dict(channel_first=2), ValueError, r"channel_first=2"),
    (dict(d_conv=4), ValueError, r"ssm_conv must be odd"),
    (dict(d_model=8, ssm_ratio=0.1), ValueError, r"ssm_ratio \* d_model must be >= 1"),
])
def test_bad_ss2d_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        vmamba.SS2D(**dict(dict(d_model=8, d_state=2), **kwargs))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(hidden_dim=0), ValueError, r"hidden_dim must be an integer >= 1, got 0"),
    (dict(hidden_dim="8"), TypeError, r"hidden_dim must be an integer"),
    (dict(post_norm="yes"), ValueError, r"post_norm='yes'"),
    (dict(drop_path=1.5), ValueError, r"drop_path must be a number >= 0 and < 1"),
])
def test_bad_block_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        vmamba.VSSBlock(**dict(dict(hidden_dim=8, ssm_d_state=2), **kwargs))


def test_odd_kernels_and_no_kernel_still_build_and_run():
    x = torch.randn(1, 3, 32, 32)
    for conv in (1, 5):
        assert vmamba.VSSM(**TINY, ssm_conv=conv)(x).shape == (1, 3)


@pytest.mark.parametrize("out_indices, error, match", [
    ((True,), TypeError, r"out_indices must be a sequence of stage numbers, got \(True,\)"),   # was "outnormTrue"
    (3, TypeError, r"out_indices must be a sequence of stage numbers, got 3"),
    ((0, 1.0), TypeError, r"out_indices must be a sequence"),
    ((0, 2), ValueError, r"out_indices must be non-empty stage numbers in \[0, 2\), got \[0, 2\]"),
    ((), ValueError, r"out_indices must be non-empty"),
])
def test_bad_backbone_out_indices_fail_at_construction(out_indices, error, match):
    with pytest.raises(error, match=match):
        vmamba.Backbone_VSSM(out_indices=out_indices, **dict(TINY, num_classes=0))


@pytest.mark.parametrize("indices, error, match", [
    (0, ValueError, r"indices=0 asks for the last 0 stages; expected 1 to 2"),
    (3, ValueError, r"indices=3 asks for the last 3 stages; expected 1 to 2"),
    ([0, 2], ValueError, r"indices must be stage numbers in \[0, 2\), got \[0, 2\]"),
    ([-3], ValueError, r"indices must be stage numbers in \[0, 2\)"),
    ([], ValueError, r"indices must be stage numbers"),
    ([True], TypeError, r"indices must be None, an int or a sequence of stage numbers, got \[True\]"),
    ("1", TypeError, r"indices must be None, an int or a sequence"),
])
def test_bad_intermediate_indices(indices, error, match):
    model = vmamba.VSSM(**TINY)
    with pytest.raises(error, match=match):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=indices)
    with pytest.raises(error, match=match):
        model.prune_intermediate_layers(indices)
    assert len(model.layers) == 2   # nothing was pruned


# --- An image in another dtype than the model ---------------------------------------------------
@pytest.mark.parametrize("image, model_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.float64, torch.float32), (torch.float32, torch.bfloat16)])
def test_mismatched_image_dtype_says_what_to_cast(image, model_dtype):
    """Not torch's "Input type (c10::Half) and bias type (float) should be the same": the message names both
    dtypes and the three ways out, for the classifier and the backbone."""
    x = torch.randn(1, 3, 32, 32, dtype=image)
    match = (rf"got a {image} image for a {model_dtype} model: cast the image with x.to\({model_dtype}\) or the "
             rf"model with model.to\({image}\), or use torch.autocast")
    backbone = vmamba.Backbone_VSSM(out_indices=(0, 1), **dict(TINY, num_classes=0)).to(model_dtype)
    for model in (vmamba.VSSM(**TINY, dtype=model_dtype), backbone):
        with pytest.raises(TypeError, match=match):
            model(x)


def test_matching_dtypes_and_autocast_still_run():
    """The check is on static dtypes only: a model cast to the image's dtype runs, and under autocast any
    float image runs (autocast casts for each op; float32 images into a float32 model is its usual use)."""
    model = vmamba.VSSM(**TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for image in (x, x.bfloat16(), x.half()):
                out = model(image)
                assert out.shape == (1, 3) and out.isfinite().all()
                assert torch.nn.functional.cosine_similarity(out.float(), ref).item() > 0.99
        assert model.bfloat16()(x.bfloat16()).dtype == torch.bfloat16
