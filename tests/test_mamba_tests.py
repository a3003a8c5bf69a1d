"""tools/mamba_tests.py on a stand-in checkout laid out as mamba's (its test file and the module
with its reference), so that the adaptation is checked without mamba: the device made 'cpu', the
committed and the wide grids, both references, and pytest's status passed through."""
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import mamba_tests  # noqa: E402

pytest.importorskip("einops", reason="the adapted test file imports einops, as mamba's does")

TEST_FILE = '''
import torch
import pytest
from einops import rearrange

from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, selective_scan_ref
from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, mamba_inner_ref


# @pytest.mark.parametrize('wtype', [torch.float32, torch.complex64])
@pytest.mark.parametrize('wtype', [torch.float32])
# @pytest.mark.parametrize('seqlen', [5, 9, 40])
@pytest.mark.parametrize('seqlen', [9])
# @pytest.mark.parametrize('seqlen', [4])
@pytest.mark.parametrize('itype', [torch.float32])
def test_selective_scan(seqlen, itype, wtype):
    device = 'cuda'
    torch.random.manual_seed(0)
    u = torch.randn(2, 4, seqlen, device=device, dtype=itype)
    delta = torch.rand(2, 4, seqlen, device=device, dtype=itype)
    A = -torch.rand(4, 3, device=device, dtype=wtype)
    B, C = torch.randn(2, 3, seqlen, device=device), torch.randn(2, 3, seqlen, device=device)
    out = selective_scan_fn(u, delta, A, B, C, delta_softplus=True)
    ref = selective_scan_ref(u, delta, A, B, C, delta_softplus=True)
    assert out.device.type == 'cpu' and torch.allclose(out, ref, rtol=RTOL, atol=1e-5)


def test_mamba_inner_fn():
    assert mamba_inner_fn is not None   # not run by the tool
'''

INTERFACE = '''
import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    delta = F.softplus(delta) if delta_softplus else delta
    h, ys = torch.zeros(u.shape[0], u.shape[1], A.shape[1]), []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1)
'''


def checkout(tmp_path, rtol):
    root = tmp_path / "mamba"
    (root / "tests" / "ops").mkdir(parents=True)
    (root / "mamba_ssm" / "ops").mkdir(parents=True)
    (root / mamba_tests.TEST).write_text(TEST_FILE.replace("RTOL", rtol))
    (root / mamba_tests.INTERFACE).write_text(textwrap.dedent(INTERFACE))
    return root


def test_wide_grid_takes_the_longest_commented_list_except_wtype():
    wide = mamba_tests.widen(TEST_FILE)
    assert "@pytest.mark.parametrize('seqlen', [5, 9, 40])" in wide.splitlines()
    assert "@pytest.mark.parametrize('wtype', [torch.float32])" in wide.splitlines()
    assert "@pytest.mark.parametrize('itype', [torch.float32])" in wide.splitlines()


@pytest.mark.parametrize("grid, count, reference", [("committed", 1, "mamba"), ("wide", 3, "float64")])
def test_runs_the_adapted_tests_against_vmamba(tmp_path, capfd, grid, count, reference):
    code = mamba_tests.main([str(checkout(tmp_path, "1e-4")), "--grid", grid, "--reference", reference])
    out = capfd.readouterr().out
    assert code == 0 and f"{count} passed" in out and "mamba_inner" not in out, out[-2000:]


def test_a_failing_case_fails_the_run(tmp_path, capfd):
    """A tolerance no float32 scan meets: pytest's status comes back."""
    assert mamba_tests.main([str(checkout(tmp_path, "-1.0"))]) == 1
    assert "1 failed" in capfd.readouterr().out


def test_not_a_checkout_is_refused(tmp_path):
    with pytest.raises(SystemExit) as err:
        mamba_tests.main([str(tmp_path)])
    assert err.value.code == 2
