"""Ecosystem contracts: FLOPs, timm, dense prediction (torch.compile and torch.export: test_contracts.py).

Optional packages (timm, torchvision, mmengine) are used when installed and skipped with
the reason shown when not; tests/requirements.txt installs them for CI. Nothing here
touches the network: pretrained weights come from a local HTTP server on 127.0.0.1.
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vmamba
from conftest import serve_folder

TINY = dict(depths=[1, 1, 1, 1], dims=16, drop_path_rate=0.0)


def tiny(**kwargs):
    torch.manual_seed(0)
    return vmamba.VSSM(**dict(TINY, **kwargs))


# ---------------------------------------------------------------------------------------
# FLOPs


def test_flops_count_any_size_and_leave_the_model_alone():
    model = tiny(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flops = model.flops((3, 64, 32))
    assert 1e6 < flops < 1e8                                 # a count, not GFLOPs
    assert model.flops((3, 32, 64)) == flops                  # the network is symmetric in H, W
    assert model.flops((3, 128, 32)) > 1.9 * flops           # about linear in the pixel count
    assert model.flops((3, 40, 24)) > 0                       # not a multiple of the stride
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not any(m._forward_pre_hooks for m in model.modules())   # its counting hooks are gone
    with torch.device("meta"):
        tiny_t = vmamba.vmamba_tiny_s1l8()
    assert tiny_t.flops() == pytest.approx(4.9e9, rel=0.03)   # the published figure, in multiply-adds


def test_flops_count_the_scan_by_the_mamba_convention():
    """9*L*D*N per SS2D, on top of the dense count; a larger state costs exactly that."""
    a, b = tiny(ssm_d_state=1), tiny(ssm_d_state=3)
    # d_state changes x_proj too: (R + 2N) outputs per direction and pixel.
    dense_extra = sum(64 * 64 / 16 / 4 ** i * 4 * d * 2 * 2 for i, d in enumerate([16, 32, 64, 128]))
    scan_extra = sum(9 * 64 * 64 / 16 / 4 ** i * 4 * d * 2 for i, d in enumerate([16, 32, 64, 128]))
    assert b.flops((3, 64, 64)) - a.flops((3, 64, 64)) == pytest.approx(dense_extra + scan_extra)


# ---------------------------------------------------------------------------------------
# timm



@pytest.fixture
def timm_mod():
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm)")
    vmamba.register_timm()   # vmamba was imported first, so import did not register
    return timm


@pytest.fixture
def served_checkpoint(tmp_path, monkeypatch):
    """A checkpoint of vmamba_tiny_s1l8 with TINY depths and widths in the released layout
    (wrapped, with training state that weights-only loading refuses), served on
    127.0.0.1; torch.hub's cache in tmp."""
    import argparse

    torch.manual_seed(1)
    with torch.device("meta"):
        shapes = vmamba.create_model("vmamba_tiny_s1l8", **TINY).state_dict()
    state = {k: torch.randn(v.shape) * 0.02 for k, v in shapes.items()}
    root = tmp_path / "www"
    root.mkdir()
    torch.save({"model": state, "epoch": 1, "config": argparse.Namespace(lr=1e-3)}, root / "ckpt.pth")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with serve_folder(root) as base:
        yield f"{base}/ckpt.pth", state


def test_timm_registers_the_zoo_once(timm_mod, recwarn):
    assert sorted(timm_mod.list_models(["vmamba_*", "vanilla_vmamba_*"])) == sorted(vmamba.list_models())
    assert sorted(vmamba.register_timm()) == sorted(vmamba.list_models())   # again: silently
    assert not [w for w in recwarn if "Overwriting" in str(w.message)]
    cfg = timm_mod.models.get_pretrained_cfg("vmamba_base_s2l15")
    assert cfg.url == vmamba.pretrained_url("vmamba_base_s2l15")
    assert (cfg.first_conv, cfg.classifier, cfg.num_classes) == ("patch_embed.0", "classifier.head", 1000)


@pytest.mark.parametrize("order, registered", [("timm, vmamba", True), ("vmamba, timm", False)])
def test_import_registers_only_when_timm_is_already_imported(order, registered):
    pytest.importorskip("timm", reason="timm is not installed (pip install timm)")
    code = f"import {order}; print(sorted(timm.list_models('*vmamba*')) == sorted(vmamba.list_models()))"
    result = subprocess.run([sys.executable, "-c", code], cwd=vmamba.__file__.rsplit("/", 1)[0],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(registered)


def test_import_loads_no_optional_package():
    """import vmamba imports none of timm, torchvision or triton (each takes a noticeable time); triton
    is imported when a Triton kernel first runs. (An installed mamba_ssm is probed at import, and
    imports triton itself.)"""
    heavy = ("timm", "torchvision") + (() if importlib.util.find_spec("mamba_ssm") else ("triton",))
    code = f"import sys, vmamba; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=vmamba.__file__.rsplit("/", 1)[0],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_timm_pretrained_with_new_head(timm_mod, served_checkpoint):
    url, state = served_checkpoint
    model = timm_mod.create_model("vmamba_tiny_s1l8", pretrained=True, num_classes=10,
                                  pretrained_cfg_overlay=dict(url=url, custom_load=True), **TINY)
    own = model.state_dict()
    assert own["classifier.head.weight"].shape == (10, 128)
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("classifier.head"))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    full = timm_mod.create_model("vmamba_tiny_s1l8", pretrained=True,
                                 pretrained_cfg_overlay=dict(url=url, custom_load=True), **TINY)
    assert torch.equal(full.state_dict()["classifier.head.weight"], state["classifier.head.weight"])


@pytest.mark.parametrize("in_chans", [1, 4])
def test_timm_pretrained_without_head_and_other_in_chans(timm_mod, served_checkpoint, in_chans):
    """timm's load_pretrained contract: num_classes=0 drops the head, the RGB first conv adapts."""
    url, state = served_checkpoint
    model = timm_mod.create_model("vmamba_tiny_s1l8", pretrained=True, num_classes=0, in_chans=in_chans,
                                  pretrained_cfg_overlay=dict(url=url, custom_load=True), **TINY)
    own = model.state_dict()
    assert not any(k.startswith("classifier.head") for k in own)
    rgb = state["patch_embed.0.weight"]
    expected = rgb.sum(1, keepdim=True) if in_chans == 1 else torch.cat([rgb, rgb[:, :1]], 1) * 3 / 4
    torch.testing.assert_close(own["patch_embed.0.weight"], expected)
    assert all(torch.equal(own[k], v) for k, v in state.items()
               if not k.startswith(("classifier.head", "patch_embed.0.weight")))
    assert model(torch.randn(1, in_chans, 32, 32)).shape == (1, 128)


def test_timm_features_only(timm_mod, served_checkpoint):
    url, state = served_checkpoint
    model = timm_mod.create_model("vmamba_tiny_s1l8", pretrained=True, features_only=True,
                                  out_indices=(1, 2, 3), pretrained_cfg_overlay=dict(url=url, custom_load=True),
                                  **TINY).eval()
    assert model.feature_info.channels() == [32, 64, 128]
    assert model.feature_info.reduction() == [8, 16, 32]
    feats = model(torch.randn(2, 3, 64, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 8, 4), (2, 64, 4, 2), (2, 128, 2, 1)]
    reference = vmamba.vmamba_tiny_s1l8(pretrained=state, **TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, indices=(1, 2, 3), intermediates_only=True)
        for got, want in zip(model(x), expected):
            torch.testing.assert_close(got, want)


def test_timm_features_only_prunes_unused_stages(timm_mod):
    model = timm_mod.create_model("vmamba_tiny_s1l8", features_only=True, out_indices=(0, 1), **TINY)
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [16, 32]
    feats[0].sum().add(feats[1].sum()).backward()
    assert all(p.grad is not None for p in model.parameters())   # nothing unused (DDP-safe)


def test_timm_data_config(timm_mod):
    model = timm_mod.create_model("vanilla_vmamba_tiny", **TINY)
    config = timm_mod.data.resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 224, 224)
    assert config["interpolation"] == "bicubic"
    assert config["crop_pct"] == 0.875
    assert config["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert config["std"] == pytest.approx((0.229, 0.224, 0.225))


def test_timm_model_api():
    model = tiny(num_classes=10)
    assert model.get_classifier() is model.classifier.head
    model.reset_classifier(5)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert model.forward_head(feats, pre_logits=True).shape == (1, model.num_features)
    assert [(f["num_chs"], f["reduction"]) for f in model.feature_info] == [(16, 4), (32, 8), (64, 16), (128, 32)]
    names = model.no_weight_decay()
    for kind in ("A_logs", "Ds", "dt_projs_bias"):
        assert sum(n.endswith(kind) for n in names) == 4, kind


def test_factory_device_and_dtype():
    """PyTorch's (and timm's) factory keywords: parameters are created where asked, and a new
    head joins the model's device, dtype and train/eval mode."""
    model = vmamba.create_model("vmamba_tiny_s1l8", device="meta", dtype=torch.float64)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.float64)}
    assert model(torch.empty(1, 3, 224, 224, device="meta", dtype=torch.float64)).shape == (1, 1000)
    backbone = vmamba.create_model("vanilla_vmamba_tiny", features_only=True, device="meta")
    assert {p.device.type for p in backbone.parameters()} == {"meta"}
    model = tiny(num_classes=10).to(torch.float64).eval()
    model.reset_classifier(3)
    head = model.get_classifier()
    assert head.weight.dtype == torch.float64 and not head.training
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 3)


def test_global_pool_none_keeps_the_map():
    """timm's global_pool='': no pooling, the output is (B, C, H, W)."""
    model = tiny(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        pooled = model(x)
        model.reset_classifier(0, "")
        fmap = model(x)
        assert fmap.shape == (2, 128, 2, 1)
        norm = model.classifier.norm
        expected = norm(model.forward_features(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(fmap, expected)
        model.reset_classifier(0)          # None keeps the pooling as it is
        assert model(x).shape == (2, 128, 2, 1)
        model.reset_classifier(10, "avg")
        assert model(x).shape == pooled.shape
    unpooled = tiny(num_classes=5, global_pool="").eval()
    with torch.no_grad():
        assert unpooled(x).shape == (2, 5, 2, 1)
        assert unpooled.forward_head(unpooled.forward_features(x), pre_logits=True).shape == (2, 128, 2, 1)
    with pytest.raises(ValueError, match="global_pool='max'"):
        model.reset_classifier(0, "max")


def test_grad_checkpointing_same_outputs_and_gradients():
    x = torch.randn(2, 3, 32, 32)
    results = []
    for enable in (False, True):
        model = tiny(num_classes=10)
        model.set_grad_checkpointing(enable)
        out = model(x)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-6, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------
# Dense prediction


def test_register_mm_names_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mmengine", None)    # as if not installed
    monkeypatch.setitem(sys.modules, "mmengine.registry", None)
    with pytest.raises(ImportError, match="mim install mmengine"):
        vmamba.register_mm()


def test_register_mm_registers_the_authors_name():
    registry = pytest.importorskip("mmengine.registry", reason="mmengine is not installed (mim install mmengine)")
    assert vmamba.register_mm() is vmamba.Backbone_VSSM
    vmamba.register_mm()   # twice is fine
    backbone = registry.MODELS.build(dict(type="MM_VSSM", out_indices=(1, 3), **TINY))
    assert [f.shape[1] for f in backbone(torch.randn(1, 3, 64, 64))] == [32, 128]


def test_torchvision_fpn_on_the_backbone():
    ops = pytest.importorskip("torchvision.ops", reason="torchvision is not installed (pip install torchvision)")
    backbone = vmamba.Backbone_VSSM(out_indices=(1, 2, 3), **TINY)
    fpn = ops.FeaturePyramidNetwork([f["num_chs"] for f in backbone.feature_info], out_channels=32)
    feats = backbone(torch.randn(2, 3, 128, 96))
    pyramid = fpn({str(i): f for i, f in enumerate(feats)})
    assert [tuple(p.shape) for p in pyramid.values()] == [(2, 32, 16, 12), (2, 32, 8, 6), (2, 32, 4, 3)]
    sum(p.sum() for p in pyramid.values()).backward()
    assert all(p.grad is not None for p in backbone.parameters())


CONFIGS = Path(__file__).resolve().parents[1] / "docs" / "configs"
# (config file, where the config names the channels it expects of the backbone's four maps)
MM_CONFIGS = [("mask-rcnn_vmamba-tiny_fpn_1x_coco.py", "cfg.model.neck.in_channels"),
              ("upernet_vmamba-tiny_4xb4-160k_ade20k-512x512.py", "cfg.model.decode_head.in_channels")]
MM_BUILD = r"""
import sys, torch
from mmengine.config import Config
from mmengine.model import BaseModule
from mmengine.registry import MODELS
cfg = Config.fromfile(sys.argv[1])               # imports vmamba through custom_imports: that registers MM_VSSM
backbone_cfg = cfg.model.backbone
backbone_cfg.init_cfg.checkpoint = sys.argv[2]   # a local stand-in for the release
backbone = MODELS.build(backbone_cfg)
parent = BaseModule()
parent.backbone = backbone
parent.init_weights()                            # as OpenMMLab's runner does: loads init_cfg's checkpoint
ok = torch.equal(backbone.layers[2].blocks[0].op.A_logs, torch.load(sys.argv[2])["model"]["layers.2.blocks.0.op.A_logs"])
with torch.no_grad():
    maps = backbone(torch.randn(1, 3, 64, 96))
print("CHANNELS", [m.shape[1] for m in maps], "EXPECTED", list(eval(sys.argv[3])), "LOADED", ok)
"""


@pytest.mark.parametrize("config, expected", MM_CONFIGS)
def test_openmmlab_example_configs_build_the_backbone_through_the_registry(config, expected, tmp_path):
    """Each example config, with its ``_base_`` (mmdet's or mmseg's own config) and the merge keys left out, builds MM_VSSM through
    mmengine's registry in a fresh process, loads its init_cfg checkpoint in init_weights, and the maps' channels
    are those its neck or decode head expects."""
    pytest.importorskip("mmengine", reason="mmengine is not installed (mim install mmengine)")
    text = (CONFIGS / config).read_text()
    assert 'type="MM_VSSM"' in text and "_base_ = [" in text
    local = tmp_path / config
    without_base = "\n".join(line for line in text.splitlines() if not line.startswith("_base_"))
    local.write_text(re.sub(r"_delete_=True,\s*", "", without_base))   # _delete_: a key for merging with the base
    torch.manual_seed(0)
    ckpt = tmp_path / "release.pth"
    torch.save({"model": vmamba.vmamba_tiny_s1l8().state_dict(), "epoch": 1}, ckpt)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CONFIGS.parents[1]), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", MM_BUILD, str(local), str(ckpt), expected], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("CHANNELS"))
    channels, rest = line[len("CHANNELS "):].split(" EXPECTED ")
    wanted, loaded = rest.split(" LOADED ")
    assert channels == wanted == "[96, 192, 384, 768]" and loaded == "True"


def test_frozen_stages_get_no_gradient_and_stay_in_eval_mode():
    torch.manual_seed(0)
    backbone = vmamba.Backbone_VSSM(frozen_stages=2, out_indices=(0, 1, 2, 3), **dict(TINY, drop_path_rate=0.5))
    frozen = ("patch_embed.", "layers.0.", "layers.1.", "outnorm0.", "outnorm1.")
    backbone.train()
    assert not backbone.layers[1].training and backbone.layers[2].training and not backbone.patch_embed.training
    sum(m.square().mean() for m in backbone(torch.randn(2, 3, 64, 64))).backward()
    for name, p in backbone.named_parameters():
        assert (p.grad is None) == name.startswith(frozen), name
        assert p.requires_grad != name.startswith(frozen), name
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():   # frozen stages skip drop path in training mode: their maps are deterministic
        first, again = backbone(x)[:2], backbone(x)[:2]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    stem_only = vmamba.Backbone_VSSM(frozen_stages=0, **TINY)
    assert {n.split(".")[0] for n, p in stem_only.named_parameters() if not p.requires_grad} == {"patch_embed"}
    assert all(p.requires_grad for p in vmamba.Backbone_VSSM(**TINY).parameters())


@pytest.mark.parametrize("kwargs, message", [
    (dict(frozen_stages=5), "frozen_stages"), (dict(frozen_stages=-2), "frozen_stages"),
    (dict(init_cfg=dict(type="Kaiming")), "init_cfg"), (dict(init_cfg="ckpt.pth"), "init_cfg"),
    (dict(norm_eval="yes"), "norm_eval"), (dict(frozen_stage=1), "did you mean 'frozen_stages'")])
def test_openmmlab_keywords_are_checked_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        vmamba.Backbone_VSSM(**dict(TINY, **kwargs))


def test_init_cfg_loads_only_in_init_weights(tmp_path):
    torch.manual_seed(0)
    source = vmamba.Backbone_VSSM(**TINY)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    backbone = vmamba.Backbone_VSSM(init_cfg=dict(type="Pretrained", checkpoint=str(path)), norm_eval=True, **TINY)
    assert not torch.equal(backbone.patch_embed[0].weight, source.patch_embed[0].weight)
    backbone.init_weights()
    for name, value in source.state_dict().items():
        assert torch.equal(backbone.state_dict()[name], value), name
