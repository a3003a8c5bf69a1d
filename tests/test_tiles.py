"""Large maps in inference: the stem, the blocks and the downsampling run in bands of rows and the scans in tiles
(issue #44). The same values as the untiled path, at sizes that cut every band and tile unevenly, and memory that
grows with the pixels alone."""

import pytest
import torch

import vmamba
from conftest import PeakBytes

FAMILIES = ["vanilla_vmamba_tiny", "vmamba_tiny_s2l5", "vmamba_tiny_s1l8"]   # v0 gated N=16 ln, v05_noz N=1 ln2d


def _rel(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _pair(name, tile_rows, **kwargs):
    """The same random model untiled (tile_rows larger than any map) and with ``tile_rows``."""
    torch.manual_seed(0)
    untiled = vmamba.create_model(name, tile_rows=10 ** 6, **kwargs).eval()
    tiled = vmamba.create_model(name, tile_rows=tile_rows, **kwargs).eval()
    tiled.load_state_dict(untiled.state_dict())
    return untiled, tiled


@pytest.mark.parametrize("tile_rows", [1, 2, 3])
@pytest.mark.parametrize("name", FAMILIES)
def test_tiled_model_matches_untiled(name, tile_rows):
    """A small forced tile size runs every tiled path in seconds: logits and every stage's map at an odd size
    (maps 16x11 down to 2x2, cut unevenly), in no_grad and in inference mode."""
    untiled, tiled = _pair(name, tile_rows, depths=[1, 2, 1, 1], dims=8, num_classes=7)
    x = torch.randn(2, 3, 61, 45)
    with torch.no_grad():
        ref, ref_maps = untiled(x), untiled.forward_intermediates(x, intermediates_only=True)
        got, maps = tiled(x), tiled.forward_intermediates(x, intermediates_only=True)
    with torch.inference_mode():
        assert _rel(tiled(x), ref) < 1e-5
    assert _rel(got, ref) < 1e-5
    assert all(_rel(g, r) < 1e-5 for g, r in zip(maps, ref_maps))


@pytest.mark.parametrize("name", FAMILIES)
def test_tiled_backbone_matches_untiled(name):
    untiled, tiled = _pair(name, 2, depths=[1, 1, 1, 1], dims=8, features_only=True)
    x = torch.randn(1, 3, 75, 52)
    with torch.no_grad():
        for got, ref in zip(tiled(x), untiled(x)):
            assert got.shape == ref.shape and _rel(got, ref) < 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_training_keeps_the_untiled_path(name):
    """Tiles serve inference: under autograd (and in train mode) the tiled model computes what the untiled one
    does, outputs and gradients, and nothing writes into its input."""
    untiled, tiled = _pair(name, 2, depths=[1, 1], dims=8, num_classes=7, drop_path_rate=0.0)
    x = torch.randn(2, 3, 37, 29)
    for model in (untiled, tiled):
        model.train()
    outs = [m(x) for m in (untiled, tiled)]
    grads = [torch.autograd.grad(o.square().sum(), list(m.parameters())) for o, m in zip(outs, (untiled, tiled))]
    assert _rel(outs[1], outs[0]) < 1e-6
    assert all(_rel(g, r) < 1e-5 for g, r in zip(grads[1], grads[0]) if r.abs().max() > 0)


@pytest.mark.compile
def test_torch_compile_and_export_of_the_tiled_path_match_eager():
    """Without autograd torch.compile(fullgraph=True) and torch.export trace the bands and tiles (a graph fixed to
    the shape) and reproduce the untiled eager model."""
    untiled, tiled = _pair("vmamba_tiny_s1l8", 2, depths=[1, 1], dims=8, num_classes=10)
    x = torch.randn(2, 3, 28, 20)                                        # stage maps 7x5 and 4x3
    torch.compiler.reset()
    with torch.no_grad():
        ref = untiled(x)
        assert _rel(torch.compile(tiled, fullgraph=True)(x), ref) < 1e-4
        exported = torch.export.export(tiled, (x,)).module()
    torch.compiler.reset()
    with torch.no_grad():
        assert _rel(exported(x), ref) < 1e-4


def test_memory_per_pixel_does_not_grow_with_the_image():
    """A VMamba-T (one block a stage) forward in inference mode at 512 and 1024 px, counting every tensor its torch
    functions return (exact and deterministic, unlike the process's resident set): no more per pixel at the larger
    size, there at most 7 first-stage maps (B, 96, H/4, W/4) (untiled: ~11.5; at 512 px the tiles' fixed size
    weighs more, and the second stage's map is small enough to run untiled)."""
    torch.manual_seed(0)
    model = vmamba.vmamba_tiny_s1l8(depths=[1, 1, 1, 1]).eval()
    per_map = []
    for size in (512, 1024):
        x = torch.randn(1, 3, size, size)
        with torch.inference_mode(), PeakBytes() as counter:
            model(x)
        per_map.append(counter.peak / ((size // 4) ** 2 * 96 * 4))
    assert per_map[1] <= 7, per_map
    assert per_map[1] <= per_map[0] * 1.02, per_map
