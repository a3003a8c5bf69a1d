"""Shared test fixtures: the contract data beside the repository (../shared)."""
import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU under the interpreter, which must be chosen before they are
# defined (at import of vmamba). The "auto" backend on CPU stays pure PyTorch regardless.
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("VMAMBA_SHARED", ROOT.parent / "shared"))


def shared_file(*parts: str) -> Path:
    """A file of the contract data; missing data fails under CI and skips elsewhere."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"contract data not found: {path} (set VMAMBA_SHARED to the shared/ folder)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


FIXTURES = ["v0_square", "v2_ln2d_square"]


@pytest.fixture(params=FIXTURES)
def fixture(request):
    """One reference computation of the authors' implementation."""
    return torch.load(shared_file("fixtures", f"{request.param}.pt"), weights_only=True)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
