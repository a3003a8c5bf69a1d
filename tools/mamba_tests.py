#!/usr/bin/env python
"""mamba_ssm's own selective-scan tests, run on the CPU against vmamba.selective_scan.

    git clone https://github.com/state-spaces/mamba /tmp/mamba     # or any checkout of it
    python tools/mamba_tests.py /tmp/mamba                          # the grid as mamba commits it
    python tools/mamba_tests.py /tmp/mamba --grid wide              # every value it lists
    python tools/mamba_tests.py /tmp/mamba --grid wide --reference float64 -- -x -q

Nothing of mamba is copied into this project: in a temporary folder the script writes
(1) a module ``mamba_ssm.ops.selective_scan_interface`` whose ``selective_scan_fn`` is
``vmamba.selective_scan`` with ``--backend`` (triton runs interpreted), and whose
``selective_scan_ref`` is mamba's own reference, read at run time from the checkout's file
of that name, or with ``--reference float64`` the same recurrence in float64
(``vmamba.selective_scan_ref`` on float64 copies, the output cast back to the input's dtype,
as mamba's reference returns it); (2) the checkout's ``tests/ops/test_selective_scan.py``
with ``device = 'cpu'`` and, with ``--grid wide``, each parameter list replaced by the
longest one the file leaves commented out above it (except ``wtype``: complex weights are
not supported here, they are a TypeError). It then runs pytest on ``test_selective_scan``
there and exits with pytest's status. Needs pytest and einops (mamba's test imports it).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = Path("tests/ops/test_selective_scan.py")
INTERFACE = Path("mamba_ssm/ops/selective_scan_interface.py")
DECORATOR = re.compile(r"^(#\s*)?@pytest\.mark\.parametrize\((['\"])(\w+)\2,\s*(\[.*\])\)\s*$")

SHIM = '''"""vmamba.selective_scan under mamba_ssm's name; the reference as chosen (see tools/mamba_tests.py)."""
import ast
import sys

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

sys.path.insert(0, {root!r})
import vmamba

BACKEND, REFERENCE, INTERFACE = {backend!r}, {reference!r}, {interface!r}


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    return vmamba.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                 backend=BACKEND)


def _float64_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                 return_last_state=False):
    up = lambda t: None if t is None else t.double()
    out = vmamba.selective_scan_ref(*map(up, (u, delta, A, B, C, D, z, delta_bias)), delta_softplus,
                                    return_last_state)
    return (out[0].to(u.dtype), out[1].float()) if return_last_state else out.to(u.dtype)


def _mamba_ref():
    with open(INTERFACE) as f:
        tree = ast.parse(f.read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "selective_scan_ref")
    scope = dict(torch=torch, F=F, rearrange=rearrange, repeat=repeat)
    exec(compile(ast.Module([node], []), INTERFACE, "exec"), scope)
    return scope["selective_scan_ref"]


selective_scan_ref = _float64_ref if REFERENCE == "float64" else _mamba_ref()
mamba_inner_fn = mamba_inner_ref = None   # imported by the test file; their tests are not run
'''


def widen(source: str) -> str:
    """Each active parametrize list of test_selective_scan replaced by the longest commented-out
    list of the same name in its decorator block (wtype kept)."""
    lines, out, pending = source.splitlines(), [], {}
    for line in lines:
        match = DECORATOR.match(line.strip())
        if match and match.group(1):   # a commented-out alternative
            name, values = match.group(3), match.group(4)
            if name != "wtype" and values.count(",") >= pending.get(name, "").count(","):
                pending[name] = values
        elif match and match.group(3) in pending:
            name = match.group(3)
            line = f"@pytest.mark.parametrize({match.group(2)}{name}{match.group(2)}, {pending.pop(name)})"
        elif line.startswith("def "):
            pending = {}
        out.append(line)
    return "\n".join(out) + "\n"


def prepare(checkout: Path, folder: Path, grid: str, backend: str, reference: str) -> Path:
    """Write the shim package and the adapted test file into folder; returns the test file."""
    source = (checkout / TEST).read_text()
    if "device = 'cuda'" not in source:
        raise SystemExit(f"{checkout / TEST}: no \"device = 'cuda'\" line; is this a mamba checkout?")
    source = source.replace("device = 'cuda'", "device = 'cpu'")
    if grid == "wide":
        source = widen(source)
    package = folder / "mamba_ssm" / "ops"
    package.mkdir(parents=True)
    for init in (folder / "mamba_ssm" / "__init__.py", package / "__init__.py"):
        init.write_text("")
    (package / "selective_scan_interface.py").write_text(SHIM.format(
        root=str(ROOT), backend=backend, reference=reference, interface=str(checkout / INTERFACE)))
    test = folder / "test_selective_scan.py"
    test.write_text(source)
    return test


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a clone of github.com/state-spaces/mamba")
    parser.add_argument("--grid", choices=("committed", "wide"), default="committed")
    parser.add_argument("--backend", choices=("torch", "triton"), default="torch")
    parser.add_argument("--reference", choices=("mamba", "float64"), default="mamba")
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)   # what follows -- goes to pytest
    args, pytest_args = parser.parse_args(argv[:cut]), argv[cut + 1:]
    for path in (TEST, INTERFACE):
        if not (args.checkout / path).is_file():
            parser.error(f"{args.checkout / path} does not exist; pass a checkout of state-spaces/mamba")
    with tempfile.TemporaryDirectory() as tmp:
        test = prepare(args.checkout.resolve(), Path(tmp), args.grid, args.backend, args.reference)
        env = dict(os.environ, PYTHONPATH=tmp)
        if args.backend == "triton":
            env["TRITON_INTERPRET"] = "1"
        command = [sys.executable, "-m", "pytest", f"{test}::test_selective_scan", "-p", "no:cacheprovider",
                   "--rootdir", tmp, *(pytest_args or ["-q"])]
        print(" ".join(command), flush=True)
        return subprocess.run(command, cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
