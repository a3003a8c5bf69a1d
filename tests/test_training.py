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
