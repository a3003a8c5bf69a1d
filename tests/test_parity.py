"""The model reproduces the authors' outputs and publishes the released layout."""
import json

import pytest
import torch

import vmamba
from conftest import data_file


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _loaded(fixture, **overrides):
    model = vmamba.VSSM(**dict(fixture["config"], **overrides)).eval()
    vmamba.load_pretrained(model, fixture["state_dict"])
    return model


@pytest.mark.parametrize("norm_layer", ["ln", "ln2d"])
def test_fixture_logits(fixture, norm_layer):
    model = _loaded(fixture, norm_layer=norm_layer)
    with torch.no_grad():
        out = model(fixture["input"])
    assert _rel(out, fixture["output"]) < 1e-5


def test_backbone_matches_classifier_stages(fixture):
    """Backbone maps are the classifier's stage outputs through each outnorm."""
    cls = _loaded(fixture)
    cfg = {k: v for k, v in fixture["config"].items() if k != "num_classes"}
    backbone = vmamba.Backbone_VSSM(out_indices=(0, 1, 2, 3), pretrained=fixture["state_dict"], **cfg).eval()
    for i in range(4):  # give the outnorms non-trivial affine parameters
        norm = getattr(backbone, f"outnorm{i}")
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = fixture["input"][:, :, :48, :40]
    with torch.no_grad():
        feats = backbone(x)
        final, stages = cls.forward_intermediates(x)
        logits = cls(x)
    assert [f.shape[1] for f in feats] == [i["num_chs"] for i in backbone.feature_info]
    assert [i["reduction"] for i in backbone.feature_info] == [4, 8, 16, 32]
    for i, (f, s) in enumerate(zip(feats, stages)):
        norm = getattr(backbone, f"outnorm{i}")
        expected = torch.nn.functional.layer_norm(s.permute(0, 2, 3, 1), s.shape[1:2], norm.weight, norm.bias,
                                                  norm.eps).permute(0, 3, 1, 2)
        assert f.is_contiguous() and f.shape == s.shape
        assert _rel(f, expected) < 1e-6
    assert _rel(cls.forward_head(final), logits) < 1e-6


@pytest.mark.parametrize("size", [(64, 96), (61, 47), (33, 65)])
def test_non_square_and_odd_inputs(fixture, size):
    model = _loaded(fixture)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        out = model(x)
        strides = [f.shape[-2:] for f in model.forward_intermediates(x, intermediates_only=True)]
    assert out.shape == (1, 10) and out.isfinite().all()
    h, w = size
    expected = []
    for i in range(4):
        h, w = (h // 4, w // 4) if i == 0 and fixture["config"]["patchembed_version"] == "v1" else (
            ((h + 1) // 2, (w + 1) // 2) if i else (((h + 1) // 2 + 1) // 2, ((w + 1) // 2 + 1) // 2))
        expected.append((h, w))
    assert [tuple(s) for s in strides] == expected


def test_channels_first_and_last_blocks_agree(fixture):
    """A block built with channel_first=True (as VSSM builds them) computes the same map on
    NCHW input as a channels-last block with the same weights."""
    model = _loaded(fixture)
    block = model.layers[0].blocks[0]
    kwargs = {k: fixture["config"][k] for k in ("ssm_d_state", "ssm_ratio", "ssm_conv_bias", "forward_type",
                                                "mlp_ratio")}
    cf = vmamba.VSSBlock(16, channel_first=True, **kwargs).eval()
    cl = vmamba.VSSBlock(16, channel_first=False, **kwargs).eval()
    cf.load_state_dict(block.state_dict())
    cl.load_state_dict(block.state_dict())
    x = torch.randn(2, 7, 9, 16)
    with torch.no_grad():
        expected = cl(x)
        assert _rel(cf(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), expected) < 1e-6
        assert _rel(block(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), expected) < 1e-6


@pytest.mark.parametrize("name", vmamba.list_models())
def test_zoo_state_dict_is_the_released_layout(name):
    spec = json.loads(data_file("zoo_state_dict.json").read_text())[name]
    with torch.device("meta"):
        model = vmamba.create_model(name)
    state = model.state_dict()
    assert list(state) == list(spec["state_dict"])
    assert {k: list(v.shape) for k, v in state.items()} == spec["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == spec["params"]
