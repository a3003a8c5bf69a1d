"""Export a zoo model every supported way and check each result against eager PyTorch.

    python tools/export_check.py                        # vmamba_tiny_s1l8 at 224 px
    python tools/export_check.py --batches 1,3,8 --json export.json

For each path: seconds to export, graph size, and the largest relative difference of the
logits from the eager model's (max |a - b| / max |b|) at every batch size in ``--batches``:

- ``torch.export`` with a static shape (the example batch only) and with a dynamic batch
  dimension (one program for every batch size);
- ``torch.onnx.export`` with the legacy TorchScript exporter (static shape) and with the
  dynamo exporter and a dynamic batch, run in onnxruntime (needs onnx, onnxruntime and
  onnxscript);
- ``torch.compile(fullgraph=True)`` (inductor), each batch size compiled on first use.

Exits 1 when a path fails or differs by more than ``--tol``.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

TOOLS = Path(__file__).resolve().parent
for _path in (str(TOOLS.parent), str(TOOLS)):  # vmamba.py, and _common.py beside this file
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

import vmamba  # noqa: E402
from _common import int_list, optional_import, print_table, write_json  # noqa: E402


def _rel(got: Any, ref: torch.Tensor) -> float:
    got = torch.as_tensor(got)
    return ((got - ref).abs().max() / ref.abs().max()).item()


def _onnx_runner(model_bytes: bytes) -> Callable[[torch.Tensor], Any]:
    ort = optional_import("onnxruntime", "onnxruntime", "running the ONNX exports")
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": x.numpy()})[0]


def _torch_export(model: torch.nn.Module, x: torch.Tensor, dynamic: bool) -> Any:
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
    program = torch.export.export(model, (x,), dynamic_shapes=shapes)
    return program.module(), len(program.graph.nodes)


def _onnx_legacy(model: torch.nn.Module, x: torch.Tensor, dynamic: bool) -> Any:
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=18, input_names=["image"],
                      output_names=["logits"])
    onnx = optional_import("onnx", "onnx", "counting ONNX nodes")
    return _onnx_runner(buffer.getvalue()), len(onnx.load_from_string(buffer.getvalue()).graph.node)


def _onnx_dynamo(model: torch.nn.Module, x: torch.Tensor, dynamic: bool) -> Any:
    optional_import("onnxscript", "onnxscript", "the dynamo ONNX exporter")
    program = torch.onnx.export(model, (x,), dynamo=True, input_names=["image"], output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    return _onnx_runner(program.model_proto.SerializeToString()), len(program.model_proto.graph.node)


def _compiled(model: torch.nn.Module, x: torch.Tensor, dynamic: bool) -> Any:
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True)
    compiled(x)   # the first call compiles; its time is the export time
    return compiled, None


# name: (exporter, dynamic batch); the example batch is the first of --batches for static
# paths and 2 for dynamic ones (torch.export specialises a dimension of size 1).
PATHS = {
    "torch.export (static)": (_torch_export, False),
    "torch.export (dynamic batch)": (_torch_export, True),
    "onnx legacy (static)": (_onnx_legacy, False),
    "onnx dynamo (dynamic batch)": (_onnx_dynamo, True),
    "torch.compile": (_compiled, False),
}


def check(model: torch.nn.Module, size: int, batches: Sequence[int], paths: Sequence[str],
          tol: float) -> List[Dict[str, Any]]:
    """One row per path: export seconds, graph nodes, the worst relative error over ``batches``
    (only the first batch for static paths), and ok/FAILED."""
    rows = []
    for name in paths:
        export, dynamic = PATHS[name]
        runs = batches if dynamic or name == "torch.compile" else batches[:1]
        row: Dict[str, Any] = dict(path=name, export_s="-", nodes="-", batches=",".join(map(str, runs)),
                                   max_rel_err="-", status="ok")
        try:
            x = torch.randn(2 if dynamic else runs[0], 3, size, size)
            start = time.perf_counter()
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")   # tracer and exporter chatter
                run, nodes = export(model, x, dynamic)
            row.update(export_s=round(time.perf_counter() - start, 1), nodes=nodes if nodes is not None else "-")
            errors = []
            for n in runs:
                inputs = torch.randn(n, 3, size, size)
                with torch.no_grad():
                    errors.append(_rel(run(inputs), model(inputs)))
            row["max_rel_err"] = f"{max(errors):.1e}"
            if not max(errors) <= tol:
                row["status"] = f"FAILED: differs from eager by {max(errors):.1e} (tol {tol:.0e})"
        except Exception as e:  # report every path, then fail
            row["status"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    parser = argparse.ArgumentParser(prog="tools/export_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vmamba_tiny_s1l8", help="zoo name (default: vmamba_tiny_s1l8)")
    parser.add_argument("--size", type=int, default=224, help="input resolution (default: 224)")
    parser.add_argument("--batches", type=int_list, default=[1, 3], help="batch sizes to run (default: 1,3)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {list(PATHS)}")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest accepted relative error (default: 1e-4)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--small", action="store_true", help="a two-stage, 8-channel model (a quick self-test)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the check; ``argv`` defaults to the process's arguments. Returns the exit code.
    torch's thread count is set to ``--threads`` for the run and restored afterwards."""
    args = build_parser().parse_args(argv)
    paths = args.paths.split(",")
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise SystemExit(f"--paths: unknown {unknown}; expected some of {list(PATHS)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(0)
        model = vmamba.create_model(args.model, **(dict(depths=[1, 1], dims=8) if args.small else {})).eval()
        rows = check(model, args.size, args.batches, paths, args.tol)
    finally:
        torch.set_num_threads(threads)   # --threads holds for the run only
    print(f"tools/export_check.py: {args.model}{' (small)' if args.small else ''} at {args.size} px, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; error = max |export - eager| / max |eager|")
    print_table(rows, ["path", "export_s", "nodes", "batches", "max_rel_err", "status"])
    if args.json:
        write_json(args.json, rows)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
