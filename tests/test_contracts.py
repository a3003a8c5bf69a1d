"""Contracts of issue #11, on small models of every zoo architecture.

- No forward writes into a tensor it is given: not the model's input, not any module's
  input, in train or eval mode, with autograd on, off or in inference mode, and also when
  a block's ``norm`` and ``op`` are ablated to ``nn.Identity``.
- ``torch.compile(fullgraph=True)`` (inductor, CPU) and ``torch.export`` reproduce eager,
  and a second call of the compiled model with the same shape does not recompile.
- timm's FX feature extraction (``feature_cls="fx"``) returns what the getter and
  ``forward_intermediates`` return.
- Nothing outlives a forward: no tensors are kept between calls.
- An SS2D forward holds few full-size tensors at once (peak of live tensors, exactly).
"""
import functools
import gc

import pytest
import torch
import torch.nn as nn

import vmamba
from conftest import PeakBytes

SMALL = dict(depths=[1, 1, 1, 1], dims=8)
# The zoo's two architecture families, each in its smallest useful form.
FAMILIES = {
    "vanilla": "vanilla_vmamba_tiny",   # v0 (gated), N=16, v1 patch embedding and patch merging, ln
    "v2": "vmamba_tiny_s1l8",           # v05_noz, N=1, MLP, v2 patch embedding, v3 downsample, ln2d
}
# The nine zoo models are three architectures that differ only in depths, widths and
# drop-path rates (test_three_architectures_cover_the_zoo checks it): one name each.
ARCHITECTURES = ["vanilla_vmamba_tiny", "vmamba_tiny_s2l5", "vmamba_tiny_s1l8"]
MODES = {  # (training, autograd context)
    "train, grad": (True, torch.enable_grad),
    "train, no_grad": (True, torch.no_grad),
    "train, inference_mode": (True, torch.inference_mode),
    "eval, grad": (False, torch.enable_grad),
    "eval, no_grad": (False, torch.no_grad),
    "eval, inference_mode": (False, torch.inference_mode),
}


def _rel(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _architecture(name):
    return {k: v for k, v in vmamba.model_config(name).items() if k not in ("depths", "dims", "drop_path_rate")}


def test_three_architectures_cover_the_zoo():
    covered = [_architecture(name) for name in ARCHITECTURES]
    assert all(_architecture(name) in covered for name in vmamba.list_models())


# ---------------------------------------------------------------------------------------
# No forward writes into its input


class _InputGuard:
    """Hooks on every module: after each forward, that module's tensor inputs must hold the
    values (and, for tensors with a version counter, the version) they had before it."""

    def __init__(self, model: nn.Module):
        self.changed, self._pending, self._handles = [], {}, []
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(functools.partial(self._before, name)))
            self._handles.append(module.register_forward_hook(functools.partial(self._after, name)))

    @staticmethod
    def _tensors(args):
        return [a for a in args if isinstance(a, torch.Tensor)]

    def _before(self, name, module, args):
        record = [(t, None if t.is_inference() else t._version, t.detach().clone()) for t in self._tensors(args)]
        self._pending.setdefault(name, []).append(record)

    def _after(self, name, module, args, output):
        for t, version, value in self._pending[name].pop():
            if not torch.equal(t.detach(), value) or (version is not None and t._version != version):
                self.changed.append(f"{name or 'the model'} ({type(module).__name__})")

    def remove(self):
        for handle in self._handles:
            handle.remove()


def _ablate(model: nn.Module) -> None:
    for layer in model.layers:
        for block in layer.blocks:
            block.norm, block.op = nn.Identity(), nn.Identity()


def _check_no_writes(model: nn.Module, x: torch.Tensor) -> None:
    guard = _InputGuard(model)
    try:
        for mode, (training, context) in MODES.items():
            model.train(training)
            x_before, version = x.clone(), x._version
            with context():
                out = model(x)
                outs = out if isinstance(out, list) else [out]
                if torch.is_grad_enabled():
                    sum(o.float().square().mean() for o in outs).backward()   # autograd saw no overwrites
            assert torch.equal(x, x_before) and x._version == version, f"{mode}: the input was modified"
            assert not guard.changed, f"{mode}: inputs modified by {guard.changed}"
            model.zero_grad(set_to_none=True)
    finally:
        guard.remove()


@pytest.mark.parametrize("ablated", [False, True], ids=["full", "norm_and_op_ablated"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_no_forward_writes_into_its_input(name, ablated):
    """The old in-place residual turned x + op(norm(x)) with op = norm = Identity into 2x in place."""
    torch.manual_seed(0)
    model = vmamba.create_model(name, num_classes=5, **SMALL)   # the zoo's drop_path rates: active in train
    backbone = vmamba.create_model(name, features_only=True, out_indices=(1, 3), **SMALL)
    x = torch.randn(2, 3, 24, 20)   # stage maps 6x5 (two chunks) down to 1x1
    for net in (model, backbone):
        if ablated:
            _ablate(net)
        _check_no_writes(net, x)


def test_the_guard_catches_an_in_place_residual():
    """The check itself: a block that adds in place into its input is reported."""

    class InPlaceBlock(nn.Module):
        def forward(self, x):
            return x.add_(1.0)

    model = vmamba.VSSM(num_classes=5, **SMALL)
    model.layers[1].blocks[0] = InPlaceBlock()
    with pytest.raises(AssertionError, match=r"layers\.1\.blocks\.0 \(InPlaceBlock\)"):
        _check_no_writes(model, torch.randn(1, 3, 32, 32))


# ---------------------------------------------------------------------------------------
# torch.compile and torch.export
#
# Tiny models and inputs keep each compilation to tens of seconds. Chunks of at most 4 steps
# (instead of 16) give several chunks and the log-depth carry scan at these sizes while the
# unrolled loop stays short; raising=False keeps the test meaningful (with the default chunk)
# should that internal name change.


def _compile_case(family):
    torch.manual_seed(0)
    model = vmamba.create_model(FAMILIES[family], depths=[1, 1], dims=8, num_classes=10).eval()
    return model, torch.randn(2, 3, 20, 12)   # stage maps 5x3 (L=15) and 3x2 (L=6)


@pytest.mark.compile
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile_fullgraph_matches_eager_without_recompiling(family, monkeypatch):
    monkeypatch.setattr(vmamba, "_CHUNK", 4, raising=False)
    model, x = _compile_case(family)
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        expected = model(x)
        assert _rel(compiled(x), expected) < 1e-4
        x2 = torch.randn_like(x)
        with torch.compiler.set_stance("fail_on_recompile"):   # same shape: the compiled code is reused
            got = compiled(x2)
        assert _rel(got, model(x2)) < 1e-4
    torch.compiler.reset()


@pytest.mark.compile
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile_under_bfloat16_autocast_matches_eager(family, monkeypatch):
    """Mixed precision: inference and a training step's gradients, compiled against eager.
    (torch 2.11 dropped autocast's casts inside the compiled SS2D region; the core casts its
    weights itself.) aot_eager runs the same traced graphs as inductor, without code generation."""
    monkeypatch.setattr(vmamba, "_CHUNK", 4, raising=False)
    model, x = _compile_case(family)
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            expected, got = model(x), compiled(x)
        assert got.dtype == expected.dtype == torch.bfloat16 and _rel(got, expected) < 2e-2
        grads = [torch.autograd.grad(m(x).float().square().sum(), model.parameters()) for m in (model, compiled)]
    assert max(_rel(a, b) for a, b in zip(*grads)) < 5e-2
    torch.compiler.reset()


@pytest.mark.compile
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_export_matches_eager(family, monkeypatch):
    monkeypatch.setattr(vmamba, "_CHUNK", 4, raising=False)
    model, x = _compile_case(family)
    program = torch.export.export(model, (x,))
    exported = program.module()
    with torch.no_grad():
        for inputs in (x, torch.randn_like(x)):   # nothing of the example input is baked in
            assert _rel(exported(inputs), model(inputs)) < 1e-4


@pytest.mark.compile
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_export_with_a_dynamic_batch_matches_eager(family, monkeypatch):
    """One exported program serves every batch size: with a symbolic batch the scan's blocking
    plans for one sample, so export puts no bound on the batch."""
    monkeypatch.setattr(vmamba, "_CHUNK", 4, raising=False)
    model, x = _compile_case(family)
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).module()
    with torch.no_grad():
        for n in (1, 3, 40):
            inputs = torch.randn(n, *x.shape[1:])
            assert _rel(exported(inputs), model(inputs)) < 1e-4


@pytest.mark.compile
def test_torch_compile_trains_like_eager_with_two_blocks_of_one_shape(monkeypatch):
    """Training through torch.compile, where two SS2D layers share a shape (every zoo model): the
    output and every gradient match eager. (One family: the compile takes most of a minute.)"""
    monkeypatch.setattr(vmamba, "_CHUNK", 4, raising=False)
    torch.manual_seed(0)
    model = vmamba.create_model(FAMILIES["v2"], depths=[2, 1], dims=8, num_classes=10, drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 20, 12)
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for m in (model, compiled):
        out = m(x)
        results.append((out.detach(), torch.autograd.grad(out.square().sum(), list(model.parameters()))))
    torch.compiler.reset()
    (expected, grads), (got, compiled_grads) = results
    assert _rel(got, expected) < 1e-4
    assert max(_rel(a, b) for a, b in zip(compiled_grads, grads) if b.abs().max() > 0) < 1e-3


@pytest.mark.compile
def test_torch_compile_with_dynamic_shapes_matches_eager(monkeypatch):
    """torch.compile(dynamic=True) makes the batch symbolic from the first call (the image size
    stays static), and the Python floats that reach the scan too: both batch sizes match eager."""
    monkeypatch.setattr(vmamba, "_CHUNK", 4, raising=False)
    model, x = _compile_case("v2")
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for n in (2, 5):
            inputs = torch.randn(n, *x.shape[1:])
            assert _rel(compiled(inputs), model(inputs)) < 1e-4
    torch.compiler.reset()


@pytest.mark.compile
def test_torch_compile_with_inductor_freezing_matches_eager(monkeypatch):
    """Freezing, switched on the way torch's CPU inference guides say (a global inductor setting),
    makes weights constants guarded by identity, so no two SS2D layers share the compiled region:
    more layers than the region's default limit of 8 entries must still compile, each on its own."""
    from torch._inductor import config as inductor_config
    monkeypatch.setattr(vmamba, "_CHUNK", 4, raising=False)
    torch.manual_seed(0)
    model = vmamba.create_model(FAMILIES["v2"], depths=[9], dims=8, num_classes=10).eval()
    x = torch.randn(1, 3, 12, 12)   # one stage of nine blocks on a 3x3 map
    torch.compiler.reset()
    with torch.no_grad(), inductor_config.patch(freezing=True):   # torch's own undo; monkeypatch's deletes it
        expected = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    torch.compiler.reset()
    assert _rel(got, expected) < 1e-4


@pytest.mark.compile
def test_ss2d_core_enters_the_compile_region_under_dynamo_only(monkeypatch):
    """torch.compile traces SS2D's core once per shape, as a nested compile region; non-strict
    torch.export (its default) would compile such a region anew at every call (minutes for a
    small model), so the core is a plain function there and in eager; and under autograd, where
    torch mislays strides when one backward region serves two layers."""
    region, calls = vmamba._ss2d_core_region, []

    def spy(*args):
        calls.append(torch.compiler.is_dynamo_compiling())
        return region(*args)

    monkeypatch.setattr(vmamba, "_ss2d_core_region", spy)
    monkeypatch.setattr(vmamba, "_CHUNK", 4, raising=False)
    model, x = _compile_case("v2")
    with torch.no_grad():
        model(x)
    torch.compiler.reset()
    with torch.no_grad():
        torch.compile(model, fullgraph=True, backend="eager")(x)
    assert calls and all(calls)
    calls.clear()
    torch.compiler.reset()
    torch.compile(model, fullgraph=True, backend="eager")(x)   # with autograd
    torch.compiler.reset()
    torch.export.export(model, (x,))
    assert calls == []


@pytest.mark.compile
def test_torch_compile_keeps_the_image_size_static_and_the_batch_dynamic(monkeypatch):
    """At a second image size torch makes H and W symbolic by default; the model keeps them
    static (a graph per size: a symbolic one compiles ~7x slower for VMamba-T). A new batch
    size may still give a symbolic batch."""
    monkeypatch.setattr(vmamba, "_CHUNK", 4, raising=False)
    model, x = _compile_case("v2")
    graphs = []

    def record(gm, example_inputs):   # per graph: which of the image's sizes are symbolic inputs of the graph
        values = [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]
        image = next(v for v in values if isinstance(v, torch.Tensor))   # the first tensor input
        symbols = {str(v) for v in values if isinstance(v, torch.SymInt)}
        graphs.append([str(s) in symbols for s in image.shape])
        return gm.forward

    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, backend=record)
    with torch.no_grad():
        for shape in ((2, 3, 20, 12), (2, 3, 24, 16), (2, 3, 28, 20), (5, 3, 28, 20)):
            inputs = torch.randn(shape)
            assert _rel(compiled(inputs), model(inputs)) < 1e-4
    torch.compiler.reset()
    assert len(graphs) == 4                                   # each new shape: one graph
    assert all(not h and not w for _, _, h, w in graphs)     # H, W never symbolic
    assert graphs[-1][0]                                     # the batch turned symbolic


# ---------------------------------------------------------------------------------------
# timm's FX feature extraction


def _load_subset(module: nn.Module, state: dict) -> None:
    """Load the model's weights into a wrapper's copy of (a part of) the model."""
    own = module.state_dict()
    module.load_state_dict({k: state[k] for k in own}, strict=True)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_timm_fx_features_match_the_getter_and_forward_intermediates(name):
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm)")
    pytest.importorskip("torchvision", reason="timm's FX feature extraction needs torchvision")
    vmamba.register_timm()
    model = vmamba.create_model(name, **SMALL).eval()
    fx = timm.create_model(name, features_only=True, feature_cls="fx", **SMALL).eval()
    getter = timm.create_model(name, features_only=True, **SMALL).eval()
    state = model.state_dict()
    _load_subset(fx.graph_module, state)
    _load_subset(getter.model, state)
    assert fx.feature_info.channels() == getter.feature_info.channels() == [8, 16, 32, 64]
    assert fx.feature_info.reduction() == getter.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(2, 3, 64, 40)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        for extractor in (fx, getter):
            got = extractor(x)
            assert [tuple(f.shape) for f in got] == [tuple(f.shape) for f in expected]
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e)


# ---------------------------------------------------------------------------------------
# Nothing outlives a forward


def _live_tensors():
    gc.collect()
    # type(), not isinstance(): the latter reads __class__, which some deprecated torch objects warn on. Plain
    # tensors and parameters only: the fake tensors that export and compile leave in torch's caches come and go.
    tensors = [o for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter)]
    # Strided ones only have a storage to measure (a compile with freezing leaves opaque oneDNN weights in torch).
    return len(tensors), sum(t.untyped_storage().nbytes() for t in tensors
                             if t.device.type != "meta" and t.layout == torch.strided)


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_is_kept_between_calls(family):
    torch.manual_seed(0)
    model = vmamba.create_model(FAMILIES[family], num_classes=5, **SMALL)
    x = torch.randn(2, 3, 32, 24)
    before = _live_tensors()
    for _ in range(2):
        model.eval()
        with torch.no_grad():
            out = model(x)
        with torch.inference_mode():
            out = model(x)
        model.train()
        model(x).square().mean().backward()
        model.zero_grad(set_to_none=True)
        del out
        assert _live_tensors() == before, "tensors (count, bytes) outlived the forward"
    kept = [f"{name}.{attr}" for name, m in model.named_modules() for attr, value in vars(m).items()
            if isinstance(value, torch.Tensor)]
    assert not kept, f"modules hold tensors besides parameters and buffers: {kept}"


@pytest.mark.parametrize("d_state", [1, 4])
@pytest.mark.parametrize("tile_rows", [None, 5])
def test_ss2d_holds_few_full_size_tensors_at_once(d_state, tile_rows):
    """An eval forward of SS2D (torch backend) holds few tensors the size of its four sequences (4 * H * W * D
    floats) at once, counting every tensor its torch functions return: at most 6.5 untiled (keeping the dt from
    before its softplus alive through the scan made it eight; keeping each step's decay and input to the end of
    pass 2, 6.75 at N=1), and when the map goes through the scans in tiles of 5 rows or columns, 1.25: its own maps
    (B, H, W, D) and a few tiles, never four directions at once."""
    torch.manual_seed(0)
    layer, x = vmamba.SS2D(d_model=32, d_state=d_state, ssm_ratio=1.0).eval(), torch.randn(1, 40, 48, 32)
    tiled = vmamba.SS2D(d_model=32, d_state=d_state, ssm_ratio=1.0, tile_rows=tile_rows).eval()
    tiled.load_state_dict(layer.state_dict())
    with torch.no_grad():
        ref = layer(x)
        with PeakBytes(x, *tiled.parameters()) as counter:
            out = tiled(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)   # the same values in tiles
    full, most = 4 * x.numel() * 4, (6.5 if tile_rows is None else 1.25)
    assert counter.peak > (full if tile_rows is None else full / 4), "the counter missed the scan's tensors"
    assert counter.peak <= most * full, f"peak {counter.peak / full:.2f} full-size tensors"
