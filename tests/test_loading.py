"""Every released checkpoint layout loads; failures are loud and change nothing."""

import pytest
import torch

import vmamba
from conftest import serve_folder


def _model(fixture, **overrides):
    return vmamba.VSSM(**dict(fixture["config"], **overrides)).eval()


def _logits(model, fixture):
    with torch.no_grad():
        return model(fixture["input"])


def _newer_single_file_layout(state):
    """The authors' later vmamba.py: unstacked projections, Sequential patch merging."""
    out = {}
    for key, value in state.items():
        if key.endswith("op.x_proj_weight"):
            key, value = key.replace("x_proj_weight", "x_proj.weight"), value.flatten(0, 1)
        elif key.endswith("op.dt_projs_weight"):
            key, value = key.replace("dt_projs_weight", "dt_projs.weight"), value.flatten(0, 1)
        elif key.endswith("op.dt_projs_bias"):
            key, value = key.replace("dt_projs_bias", "dt_projs.bias"), value.flatten()
        key = key.replace("downsample.norm.", "downsample.1.").replace("downsample.reduction.", "downsample.2.")
        out[key] = value
    return out


def _february_layout(state):
    """The first release of the vanilla models."""
    out = {}
    for key, value in state.items():
        key = key.replace("patch_embed.0.", "patch_embed.proj.").replace("patch_embed.2.", "patch_embed.norm.")
        key = key.replace(".norm.", ".ln_1.") if ".blocks." in key else key
        key = key.replace(".op.", ".self_attention.").replace("classifier.norm.", "norm.")
        out[key.replace("classifier.head.", "head.")] = value
    return out


LAYOUTS = {
    "released": lambda sd: sd,
    "newer_single_file": _newer_single_file_layout,
    "february": _february_layout,
    "ddp_prefix": lambda sd: {"module." + k: v for k, v in sd.items()},
    "backbone_prefix": lambda sd: {**{"backbone." + k: v for k, v in sd.items()},
                                   "decode_head.conv.weight": torch.zeros(1)},
    "model_wrapper": lambda sd: {"model": sd, "optimizer": {"lr": 1.0}, "epoch": 3},
    "model_ema_wrapper": lambda sd: {"model_ema": sd},
    "state_dict_wrapper": lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads(fixture, layout, tmp_path):
    state = LAYOUTS[layout](dict(fixture["state_dict"]))
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    for source in (state, str(path), path):
        model = vmamba.load_pretrained(_model(fixture), source)
        assert ((_logits(model, fixture) - fixture["output"]).abs().max() / fixture["output"].abs().max()) < 1e-5
    saved = model.state_dict()
    assert set(saved) == set(fixture["state_dict"])


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www, and a private hub cache."""
    root = tmp_path / "www"
    root.mkdir()
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with serve_folder(root) as base:
        yield root, base


def test_load_by_url(fixture, http_root):
    root, base = http_root
    torch.save({"model": fixture["state_dict"], "epoch": 1}, root / "vssm_ckpt_epoch_1.pth")
    url = f"{base}/vssm_ckpt_epoch_1.pth"
    model = vmamba.load_pretrained(_model(fixture), url, progress=False)
    assert torch.allclose(_logits(model, fixture), fixture["output"], rtol=1e-4, atol=1e-5)
    cached = list((root.parent / "hub" / "checkpoints").iterdir())
    # Not a release URL: the cache name carries a hash of the URL (vssm_ckpt_epoch_1-<12 hex>.pth).
    assert [p.name for p in cached] == [vmamba._cache_file_name(url)]
    assert cached[0].name.startswith("vssm_ckpt_epoch_1-") and cached[0].suffix == ".pth"
    # create_model(pretrained=URL) goes through the same path, and num_classes reaches the model
    cfg = {k: v for k, v in fixture["config"].items() if k != "num_classes"}
    model = vmamba.VSSM(num_classes=10, **cfg)
    assert vmamba.load_pretrained(model, url) is model


def test_failed_load_leaves_model_unchanged(fixture):
    model = _model(fixture)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    broken = dict(fixture["state_dict"])
    del broken["layers.2.blocks.1.op.Ds"]
    broken["layers.0.blocks.0.op.A_logs"] = torch.zeros(3, 3)
    broken["something.else"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing, 1 unexpected, 1 mis-shaped") as info:
        vmamba.load_pretrained(model, broken)
    assert "layers.2.blocks.1.op.Ds" in str(info.value) and "something.else" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    other = vmamba.create_model("vmamba_tiny_s1l8", num_classes=10).state_dict()
    with pytest.raises(ValueError, match="another architecture"):
        vmamba.load_pretrained(model, other)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_strict_load_warns_and_loads_the_rest(fixture):
    model = _model(fixture)
    partial = {k: v for k, v in fixture["state_dict"].items() if not k.startswith("layers.3")}
    with pytest.warns(UserWarning, match="partial load"):
        vmamba.load_pretrained(model, partial, strict=False)
    assert torch.equal(model.patch_embed[0].weight, fixture["state_dict"]["patch_embed.0.weight"])


def test_other_num_classes_keeps_fresh_head(fixture):
    cfg = dict(fixture["config"], num_classes=7)
    model = vmamba.VSSM(**cfg)
    head = model.classifier.head.weight.clone()
    with pytest.warns(UserWarning, match="10 classes and the model 7"):
        vmamba.load_pretrained(model, fixture["state_dict"])
    assert torch.equal(model.classifier.head.weight, head)
    assert torch.equal(model.patch_embed[0].weight, fixture["state_dict"]["patch_embed.0.weight"])


def test_classification_checkpoint_into_backbone(fixture):
    cfg = {k: v for k, v in fixture["config"].items() if k != "num_classes"}
    backbone = vmamba.Backbone_VSSM(out_indices=(1, 2), pretrained=fixture["state_dict"], **cfg)
    assert torch.equal(backbone.patch_embed[0].weight, fixture["state_dict"]["patch_embed.0.weight"])
    assert not hasattr(backbone, "classifier") and hasattr(backbone, "outnorm1")


def test_bad_sources():
    model = vmamba.VSSM(depths=[1], dims=8, num_classes=2)
    with pytest.raises(TypeError, match="path, an http"):
        vmamba.load_pretrained(model, 42)
    with pytest.raises(ValueError, match="no state dict found"):
        vmamba.load_pretrained(model, {"epoch": 3})


def test_bad_files_raise_clear_errors_and_change_nothing(fixture, tmp_path):
    model = _model(fixture)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        vmamba.load_pretrained(model, str(missing))
    good = tmp_path / "good.pth"
    torch.save({"model": fixture["state_dict"]}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pth could not be read as a PyTorch checkpoint"):
        vmamba.load_pretrained(model, truncated)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt could not be read"):
        vmamba.load_pretrained(model, text)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sha256_is_checked_for_urls(fixture, http_root):
    root, base = http_root
    torch.save(fixture["state_dict"], root / "w.pth")
    model = _model(fixture)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        vmamba.load_pretrained(model, f"{base}/w.pth", sha256="0" * 64, progress=False)
    assert not (root.parent / "hub" / "checkpoints" / "w.pth").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match=r"missing\.pth.*checkpoints"):
        vmamba.load_pretrained(model, f"{base}/missing.pth", progress=False)


def test_builder_pretrained_true_downloads_the_release(http_root, monkeypatch):
    """pretrained=True fetches the zoo URL (served locally here) and keeps num_classes."""
    root, base = http_root
    small = dict(depths=[1, 1, 1, 1])
    release = vmamba.vmamba_tiny_s1l8(**small)
    (root / "#v2cls").mkdir()
    torch.save({"model": release.state_dict(), "optimizer": {}, "epoch": 263},
               root / "#v2cls" / "vssm1_tiny_0230s_ckpt_epoch_264.pth")
    monkeypatch.setattr(vmamba, "_RELEASES", base + "/")
    with pytest.warns(UserWarning, match="1000 classes and the model 10"):
        model = vmamba.vmamba_tiny_s1l8(pretrained=True, num_classes=10, **small)
    assert model.classifier.head.out_features == 10
    assert torch.equal(model.layers[1].blocks[0].op.A_logs, release.layers[1].blocks[0].op.A_logs)


def test_headless_model_drops_the_checkpoint_head(fixture, recwarn):
    model = _model(fixture, num_classes=0)
    state = vmamba.checkpoint_filter_fn(fixture["state_dict"], model)
    assert not any(k.startswith("classifier.head.") for k in state)
    vmamba.load_pretrained(model, fixture["state_dict"])   # strict, and silent
    assert not [w for w in recwarn if "vmamba" in str(w.message)]
    full = vmamba.load_pretrained(_model(fixture), fixture["state_dict"])
    x = fixture["input"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), full.forward_head(full.forward_features(x), pre_logits=True))


@pytest.mark.parametrize("in_chans", [1, 2, 6])
def test_first_conv_adapts_to_in_chans(fixture, in_chans):
    """timm's rule: summed over the colours for one channel, else repeated, cut and scaled by
    3/in_chans; a grey (or repeated-RGB) image then gives the RGB model's output."""
    before = {k: v.clone() for k, v in fixture["state_dict"].items()}
    model = _model(fixture, in_chans=in_chans)
    state = vmamba.checkpoint_filter_fn(fixture["state_dict"], model)
    rgb = fixture["state_dict"]["patch_embed.0.weight"]
    expected = (rgb.sum(1, keepdim=True) if in_chans == 1
                else rgb.repeat(1, 2, 1, 1)[:, :in_chans] * 3 / in_chans)
    torch.testing.assert_close(state["patch_embed.0.weight"], expected)
    assert all(torch.equal(before[k], v) for k, v in fixture["state_dict"].items())   # pure
    vmamba.load_pretrained(model, fixture["state_dict"])
    rgb_model = vmamba.load_pretrained(_model(fixture), fixture["state_dict"])
    x = fixture["input"]
    with torch.no_grad():
        if in_chans == 1:
            grey = x.mean(1, keepdim=True)
            torch.testing.assert_close(model(grey), rgb_model(grey.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)
        elif in_chans == 6:
            torch.testing.assert_close(model(torch.cat([x, x], 1)), rgb_model(x), rtol=1e-4, atol=1e-5)
        else:
            assert model(x[:, :2]).shape == (2, 10)


def test_convert_command_writes_the_released_layout(tmp_path, capsys):
    """python vmamba.py convert IN OUT [--model NAME]: any layout in, our layout out."""
    pytest.importorskip("safetensors", reason="safetensors is not installed")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = vmamba.create_model("vanilla_vmamba_tiny").state_dict()
    state = {k: torch.randn(v.shape) for k, v in shapes.items()}
    february = tmp_path / "vssm_tiny_february.pth"
    torch.save({"model": _february_layout(state), "epoch": 300}, february)

    out = tmp_path / "vanilla_vmamba_tiny.safetensors"
    assert vmamba.main(["convert", str(february), str(out)]) == 0   # the architecture is found
    assert "vanilla_vmamba_tiny" in capsys.readouterr().out
    converted = load_file(str(out))
    assert sorted(converted) == sorted(state)   # safetensors stores its keys sorted
    assert all(torch.equal(converted[k], v) for k, v in state.items())

    out_pth = tmp_path / "converted.pth"
    assert vmamba.main(["convert", str(out), str(out_pth), "--model", "vanilla_vmamba_tiny"]) == 0
    reconverted = vmamba.load_checkpoint_file(out_pth)
    assert sorted(reconverted) == sorted(state) and all(torch.equal(v, state[k]) for k, v in reconverted.items())
    capsys.readouterr()
    # User errors: one line on stderr, exit status 2, nothing written.
    assert vmamba.main(["convert", str(out), str(tmp_path / "x.pth"), "--model", "vmamba_tiny_s1l8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vmamba.py convert: error: cannot load") and err.count("\n") == 1
    torch.save({"model": {"a.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    assert vmamba.main(["convert", str(tmp_path / "other.pth"), str(tmp_path / "y.pth")]) == 2
    assert "matches none of the zoo" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "y.pth").exists()
