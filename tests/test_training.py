"""Training works: a small VMamba learns scikit-learn's handwritten digits on CPU."""
import time

import pytest
import torch
import torch.nn.functional as F

import vmamba

datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn is not installed")


def test_learns_digits():
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0      # (1797, 1, 8, 8)
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    train, test = order[:1400], order[1400:]

    torch.manual_seed(0)
    model = vmamba.VSSM(in_chans=1, num_classes=10, depths=[1, 1, 1, 1], dims=16, drop_path_rate=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=300)
    start = time.perf_counter()
    model.train()
    for step in range(300):
        idx = train[torch.randint(len(train), (64,), generator=g)]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    elapsed = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    print(f"digits: {accuracy:.3f} held-out accuracy after 300 steps in {elapsed:.1f} s")
    assert accuracy >= 0.90


def _eval_loss(model, x, y):
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


@pytest.mark.parametrize("optimizer", ["adamw_groups", "timm_layer_decay"])
def test_one_fine_tuning_step_lowers_the_loss(optimizer, tmp_path):
    """README's fine-tuning recipe: pretrained weights, a fresh head of another class count, AdamW with no decay on
    the SSM parameters, biases and norms (or timm's optimizer with layer-wise decay); one step on a batch lowers
    that batch's loss."""
    torch.manual_seed(0)
    small = dict(depths=[1, 1, 2, 1], dims=16)
    torch.save({"model": vmamba.vmamba_tiny_s1l8(**small).state_dict()}, tmp_path / "release.pth")
    with pytest.warns(UserWarning, match="1000 classes and the model 5"):
        model = vmamba.vmamba_tiny_s1l8(pretrained=str(tmp_path / "release.pth"), num_classes=5, **small)
    assert model.classifier.head.out_features == 5
    assert model.layers[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.2)   # as the authors trained it
    if optimizer == "adamw_groups":
        no_decay = model.no_weight_decay()
        groups = [[p for n, p in model.named_parameters() if (p.ndim > 1 and n not in no_decay) == decay]
                  for decay in (True, False)]
        assert {"A_logs", "Ds", "dt_projs_bias"} <= {n.rsplit(".", 1)[-1] for n, p in model.named_parameters()
                                                     if any(p is q for q in groups[1])}
        opt = torch.optim.AdamW([{"params": groups[0], "weight_decay": 0.05},
                                 {"params": groups[1], "weight_decay": 0.0}], lr=1e-3)
    else:
        timm_optim = pytest.importorskip("timm.optim", reason="timm is not installed")
        opt = timm_optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8)
        scales = sorted({round(g["lr_scale"], 6) for g in opt.param_groups})
        assert len(scales) == 1 + 5 + 3 + 1 and scales[-1] == 1.0   # stem, 5 blocks, 3 downsamples, head
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 5, (8,))
    before = _eval_loss(model, x, y)
    model.train()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    assert _eval_loss(model, x, y) < before
