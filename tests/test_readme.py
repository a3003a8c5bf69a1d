"""README's Python snippets run as written. The release checkpoint they load is a stand-in with random weights in
the authors' layout, served from a real HTTP server on 127.0.0.1 into a private torch.hub cache: nothing is
downloaded from the internet."""
import re
import warnings
from pathlib import Path

import pytest
import torch

import vmamba
from conftest import serve_folder

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
RELEASE = "vssm1_tiny_0230s_ckpt_epoch_264.pth"   # the snippets' model: vmamba_tiny_s1l8


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """A folder holding a stand-in release file, served over HTTP; yields (folder, base URL)."""
    root = tmp_path_factory.mktemp("www")
    (root / "#v2cls").mkdir()
    torch.manual_seed(0)
    state = vmamba.vmamba_tiny_s1l8().state_dict()
    torch.save({"model": state, "optimizer": {}, "epoch": 263}, root / "#v2cls" / RELEASE)
    with serve_folder(root) as base:
        yield root, base + "/"


def test_the_readme_has_its_snippets():
    assert len(BLOCKS) >= 6 and any("features_only=True" in b for b in BLOCKS)


@pytest.mark.parametrize("index", [pytest.param(i, marks=[pytest.mark.compile] if "torch.export" in b else [])
                                   for i, b in enumerate(BLOCKS)])
def test_readme_snippet_runs(index, releases, tmp_path, monkeypatch):
    root, base = releases
    pytest.importorskip("timm") if "timm" in BLOCKS[index] else None
    pytest.importorskip("torchvision") if "torchvision" in BLOCKS[index] else None
    monkeypatch.chdir(tmp_path)
    (tmp_path / RELEASE).write_bytes((root / "#v2cls" / RELEASE).read_bytes())   # the offline snippet's file
    monkeypatch.setattr(vmamba, "_RELEASES", base)
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # e.g. "the checkpoint's head has 1000 classes and the model 10"
            exec(compile(BLOCKS[index], f"README.md, Python snippet {index + 1}", "exec"), {"__name__": "readme"})
    finally:
        torch.hub.set_dir(hub)
