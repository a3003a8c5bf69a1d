"""Latency of VMamba models side by side with timm models, and of the selective scan.

    python tools/bench.py --model vmamba_tiny_s1l8 --compare convnext_tiny --sizes 224,512 --repeats 9
    python tools/bench.py --model vmamba_tiny_s1l8 --compare convnext_tiny --batch 8 --mode train
    python tools/bench.py --compile                 # torch.compile'd models beside the eager ones
    python tools/bench.py --no-scan                 # also each model without its selective scans
    python tools/bench.py --scan                    # selective_scan against a per-position loop
    python tools/bench.py report --out docs/performance.md   # the whole set, written as a Markdown page

All timings of one table are taken in the same run, interleaved round-robin (one call of
each contender per round), and summarised by their median, so that a machine whose speed
drifts slows every contender alike. Each row also gives the median minor page faults of a
call, memory touched afresh (often memory the allocator had handed back to the system).
Uses vmamba's public API only.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

TOOLS = Path(__file__).resolve().parent
for _path in (str(TOOLS.parent), str(TOOLS)):  # vmamba.py, and _common.py beside this file
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

import vmamba  # noqa: E402
from _common import optional_import, print_table, resolve_device, write_csv, write_json  # noqa: E402

try:
    import resource  # POSIX only: page faults per call
except ImportError:
    resource = None

__all__ = ["timm_model", "bench_rows", "scan_loop", "scan_rows", "report", "main"]


# ----------------------------------------------------------------------------------------
# Models.


def timm_model(name: str, size: int) -> nn.Module:
    """A timm model with random weights, built for ``size`` px inputs when it takes a size."""
    timm = optional_import("timm", "timm", f"--compare {name}")
    try:
        return timm.create_model(name, pretrained=False, img_size=size)
    except TypeError:  # models without a fixed input size take no img_size
        return timm.create_model(name, pretrained=False)


def _skip_term_only(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, dt_projs_bias: Tensor,
                    A_logs: Tensor, Ds: Tensor, backend: str = "auto", tile_rows: Optional[int] = None) -> Tensor:
    """What :func:`vmamba.ss2d_core` returns when the scan outputs are zero: its skip term, sum_k D_k * x."""
    return x * Ds.float().view(4, -1).sum(0).to(x.dtype)


@contextlib.contextmanager
def _without_scan():
    """Inside, SS2D layers call :func:`_skip_term_only` instead of :func:`vmamba.ss2d_core`:
    the model keeps every other layer (projections, convolutions, norms, MLPs) and skips the
    four-direction scan. torch.compile guards on the swapped global, so a compiled model is
    traced once each way."""
    core, vmamba.ss2d_core = vmamba.ss2d_core, _skip_term_only
    try:
        yield
    finally:
        vmamba.ss2d_core = core


def _minor_faults() -> Optional[int]:
    """Minor page faults of this process so far (pages the kernel mapped in on first touch), or None where
    the ``resource`` module is missing (Windows)."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _median_faults(faults: List[int]) -> Any:
    """The median of a call's page-fault counts, or "-" where none were counted."""
    return round(statistics.median(faults)) if faults else "-"


def _interleaved(calls: Dict[str, Callable[[], Any]], warmup: int,
                 repeats: int) -> Tuple[Dict[str, List[float]], Dict[str, List[int]]]:
    """Run every call once per round, ``warmup`` + ``repeats`` rounds; the milliseconds and the minor page
    faults (empty lists where they cannot be counted) of each call in the last ``repeats`` rounds."""
    times: Dict[str, List[float]] = {name: [] for name in calls}
    faults: Dict[str, List[int]] = {name: [] for name in calls}
    for i in range(warmup + repeats):
        for name, call in calls.items():
            first, start = _minor_faults(), time.perf_counter()
            call()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
                faults[name] += [] if first is None else [_minor_faults() - first]
    return times, faults


def bench_rows(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Median/min/max latency of each model at each size, runs interleaved round-robin.

    With ``args.compile``, each model also runs as ``torch.compile(model, fullgraph=True)``:
    compiled once per size, its first call (compilation included) reported as
    ``compile_s``, then timed in the same rounds as the eager models. A model that fails to
    compile keeps its row, with the error in ``compile_s`` and no timings. With
    ``args.no_scan``, each vmamba model also runs as "NAME (no scan)": the same model with
    its SS2D scans replaced by their skip term (see :func:`_without_scan`), which measures
    everything but the scan. ``ratio`` is each median over the eager median of the first
    ``--compare`` model; ``faults`` the median minor page faults of a call (memory the process
    touched afresh, often memory the allocator had handed back to the system; "-" where the
    ``resource`` module is missing).
    """
    device = resolve_device(args.device)
    models = args.model.split(",")
    names = [(n, n, "vmamba") for n in models]                     # (label, model name, kind)
    names += [(f"{n} (no scan)", n, "no scan") for n in models] if args.no_scan else []
    names += [(n, n, "timm") for n in args.compare.split(",")] if args.compare else []
    train = args.mode == "train"
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        x = torch.randn(args.batch, 3, size, size, device=device)
        if args.compile:
            torch.compiler.reset()  # a fresh compilation per size, within the recompile limit

        def step(model: nn.Module, module: nn.Module, scan: bool = True) -> None:
            with contextlib.nullcontext() if scan else _without_scan():
                if train:
                    model(x).float().square().mean().backward()
                    module.zero_grad(set_to_none=True)
                else:
                    with torch.inference_mode():
                        model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        calls: Dict[Tuple[str, bool], Callable[[], None]] = {}      # (name, compiled) -> one step
        compile_s: Dict[Tuple[str, bool], Any] = {}
        for name, model_name, kind in names:
            torch.manual_seed(0)
            scan = kind != "no scan"
            module = timm_model(model_name, size) if kind == "timm" else vmamba.create_model(model_name)
            module = module.to(device).train(train)
            calls[name, False] = lambda m=module, s=scan: step(m, m, s)
            compile_s[name, False] = None
            if not args.compile:
                continue
            fast = torch.compile(module, fullgraph=True, dynamic=False, backend=args.compile_backend)
            start = time.perf_counter()
            try:
                step(fast, module, scan)
            except Exception as e:  # report it in the table and time the others
                first_line = (str(e).strip().splitlines() or [""])[0][:300]
                print(f"{name} at {size} px does not compile: {type(e).__name__}: {first_line}", file=sys.stderr)
                compile_s[name, True] = f"failed: {type(e).__name__}"
                module.zero_grad(set_to_none=True)
                continue
            compile_s[name, True] = round(time.perf_counter() - start, 2)
            calls[name, True] = lambda f=fast, m=module, s=scan: step(f, m, s)

        times, faults = _interleaved(calls, args.warmup, args.repeats)
        compare = next((name for name, _, kind in names if kind == "timm"), None)
        base = statistics.median(times[compare, False]) if compare else None
        for name, _, _ in names:
            for compiled in (False, True) if args.compile else (False,):
                t = sorted(times.get((name, compiled), []))
                row = dict(model=name, compiled=compiled, size=size, batch=args.batch, mode=args.mode,
                           device=str(device), threads=torch.get_num_threads(),
                           compile_s=compile_s[name, compiled], median_ms="-", min_ms="-", max_ms="-", ratio="-",
                           faults=_median_faults(faults.get((name, compiled), [])))
                if t:
                    median = statistics.median(t)
                    row.update(median_ms=round(median, 2), min_ms=round(t[0], 2), max_ms=round(t[-1], 2),
                               ratio=round(median / base, 3) if base else "-")
                rows.append(row)
    return rows


def _bench_models(args: argparse.Namespace) -> int:
    """Time models side by side and print (and optionally save) the table; 1 if a model
    failed to compile."""
    rows = bench_rows(args)
    compared = args.compare.split(",")[0] if args.compare else None
    compiled = f", compiled with torch.compile(fullgraph=True, backend={args.compile_backend!r})" \
        if args.compile else ""
    print(f"tools/bench.py: torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.mode}{compiled}, median of {args.repeats} after {args.warmup} warm-up runs, interleaved"
          + (f"; ratio = median / {compared}'s eager median" if compared else ""))
    columns = ["model", "size", "median_ms", "min_ms", "max_ms", "ratio", "faults"]
    if args.compile:
        columns[1:1] = ["compiled", "compile_s"]
    print_table([{**r, "compile_s": "-" if r["compile_s"] is None else r["compile_s"]} for r in rows], columns)
    _save(rows, args)
    failed = [r for r in rows if isinstance(r["compile_s"], str)]
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------
# The selective scan.


def scan_loop(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor) -> Tensor:
    """The obvious selective scan: one step per position, vectorised over batch, channels
    and state, stepping with unbind (the baseline of ``--scan``). Shapes as
    :func:`vmamba.selective_scan`; softplus is applied to ``delta + delta_bias``."""
    K = B.shape[1]
    dt = F.softplus(delta + delta_bias[:, None])                               # (B, KD, L)
    Bk, Ck = (t.repeat_interleave(u.shape[1] // K, dim=1) for t in (B, C))   # (B, KD, N, L)
    dA = torch.exp(dt.unsqueeze(2) * A[:, :, None])
    dBu = (dt * u).unsqueeze(2) * Bk
    h, ys = u.new_zeros(dA.shape[:3]), []
    for a_t, x_t, c_t in zip(dA.unbind(-1), dBu.unbind(-1), Ck.unbind(-1)):
        h = a_t * h + x_t
        ys.append((h * c_t).sum(-1))
    return torch.stack(ys, -1) + D[:, None] * u


def _torch_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor) -> Tensor:
    """The public scan with the pure-PyTorch backend, on the same inputs as :func:`scan_loop`."""
    return vmamba.selective_scan(u, delta, A, B, C, D=D, delta_bias=delta_bias, delta_softplus=True,
                                 backend="torch")


SCAN_CASES = ((96, 1, 56, False), (96, 1, 56, True), (192, 16, 56, False))  # (D, N, side, backward)
SCAN_CONTENDERS = {"loop (unbind)": scan_loop, "selective_scan(backend='torch')": _torch_scan}


def scan_rows(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """For each case of :data:`SCAN_CASES` (VMamba-T's first-stage size, K=4 directions,
    L=3136), the per-position loop and ``selective_scan(backend="torch")`` timed
    interleaved on the CPU: median and min milliseconds, speedup = loop / scan."""
    rows = []
    for D, N, side, backward in SCAN_CASES:
        side = getattr(args, "scan_side", None) or side
        g = torch.Generator().manual_seed(0)
        L, KD = side * side, 4 * D
        u, delta = torch.randn(1, KD, L, generator=g), torch.randn(1, KD, L, generator=g) - 2
        A = -torch.rand(KD, N, generator=g) * 4 - 0.1
        B, C = torch.randn(1, 4, N, L, generator=g), torch.randn(1, 4, N, L, generator=g)
        Dv, bias = torch.randn(KD, generator=g), torch.randn(KD, generator=g) * 0.1
        inputs = (u, delta, A, B, C, Dv, bias)

        def run(fn: Callable[..., Tensor]) -> None:
            if not backward:
                with torch.no_grad():
                    fn(*inputs)
                return
            fn(*[t.clone().requires_grad_() for t in inputs]).sum().backward()

        times, faults = _interleaved({name: lambda fn=fn: run(fn) for name, fn in SCAN_CONTENDERS.items()},
                                     args.warmup, args.repeats)
        base = statistics.median(times["loop (unbind)"])
        for name, t in times.items():
            rows.append(dict(case=f"K=4 D={D} N={N} L={L} {'fwd+bwd' if backward else 'fwd'}", scan=name,
                             threads=torch.get_num_threads(), median_ms=round(statistics.median(t), 2),
                             min_ms=round(min(t), 2), speedup=round(base / statistics.median(t), 2),
                             faults=_median_faults(faults[name])))
    return rows


def _bench_scan(args: argparse.Namespace) -> int:
    """Time the torch selective scan against the per-position loop and print the table."""
    rows = scan_rows(args)
    print(f"tools/bench.py --scan: torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, "
          f"median of {args.repeats} after {args.warmup} warm-up runs, interleaved; speedup = loop / scan")
    print_table(rows, ["case", "scan", "median_ms", "min_ms", "speedup", "faults"])
    _save(rows, args)
    return 0


# ----------------------------------------------------------------------------------------
# The report: every benchmark above in one run, written as docs/performance.md.

REPORT_COMPARE = ("convnext_tiny", "swin_tiny_patch4_window7_224")
README_BEGIN, README_END = "<!-- speed table: written by tools/bench.py report -->", "<!-- end of speed table -->"


def _machine() -> Dict[str, str]:
    """What the figures were measured on: CPU, cores, memory, versions, date and commit."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    memory = "-"
    with contextlib.suppress(OSError, ValueError):
        memory = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB"
    commit = "-"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=TOOLS, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "-"
    timm = sys.modules.get("timm")
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "CPU": cpu,
            "logical cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()), "memory": memory,
            "OS": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "timm": getattr(timm, "__version__", "-"), "commit": commit}


def _md_table(rows: List[Dict[str, Any]], columns: Sequence[str]) -> List[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]


def _ratios(rows: List[Dict[str, Any]], model: str) -> List[Dict[str, Any]]:
    """Rows of ``model`` with its median over each REPORT_COMPARE model's, same size and mode (compiled or not)."""
    out = []
    for r in rows:
        if r["model"] != model or r["median_ms"] == "-":
            continue
        row = dict(size=f"{r['size']} px", mode="compiled" if r["compiled"] else "eager", ms=r["median_ms"])
        for other in REPORT_COMPARE:
            o = next((o for o in rows if (o["model"], o["size"], o["compiled"]) == (other, r["size"], r["compiled"])),
                     None)
            row[f"/ {other}"] = round(r["median_ms"] / o["median_ms"], 2) if o and o["median_ms"] != "-" else "-"
        out.append(row)
    return out


def report(argv: Sequence[str]) -> int:
    """``tools/bench.py report``: inference (eager and compiled) and training of VMamba-T beside ConvNeXt-T and
    Swin-T, and the scan alone, in one run; writes a Markdown page (and README's speed table between its markers,
    with ``--readme``). Every figure comes from this run."""
    parser = argparse.ArgumentParser(prog="tools/bench.py report", description=report.__doc__)
    parser.add_argument("--out", default="docs/performance.md", help="the Markdown page to write")
    parser.add_argument("--readme", default=None, metavar="PATH",
                        help="also rewrite the table between README's speed-table markers")
    parser.add_argument("--model", default="vmamba_tiny_s1l8")
    parser.add_argument("--sizes", default="224,512")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one repeat, no compilation: checks that the report runs, measures nothing")
    args = parser.parse_args(argv)
    timm_model(REPORT_COMPARE[0], 32)   # fails early, naming the install command, without timm
    readme = Path(args.readme).read_text() if args.readme else ""
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if args.readme and not 0 <= begin < end:   # checked before the minutes of measuring
        raise SystemExit(f"{args.readme} has no speed-table markers ({README_BEGIN} ... {README_END})")
    torch.set_num_threads(args.threads)
    quick = dict(sizes="32", repeats=1, warmup=0, train_batch=2, scan_side=8) if args.quick else {}
    common = dict(model=args.model, compare=",".join(REPORT_COMPARE), device="cpu", compile_backend="inductor",
                  no_scan=False, warmup=2, repeats=args.repeats, sizes=args.sizes)
    common.update({k: v for k, v in quick.items() if k in common})
    started = time.perf_counter()
    infer = bench_rows(argparse.Namespace(**common, batch=1, mode="infer", compile=not args.quick))
    train_size = "32" if args.quick else "224"
    train = bench_rows(argparse.Namespace(**dict(common, sizes=train_size), batch=quick.get("train_batch",
                                          args.train_batch), mode="train", compile=False))
    scan = scan_rows(argparse.Namespace(warmup=common["warmup"], repeats=common["repeats"],
                                        scan_side=quick.get("scan_side")))
    minutes = (time.perf_counter() - started) / 60
    command = "python tools/bench.py report " + " ".join(shlex.quote(a) for a in argv)
    machine = _machine()
    summary = _md_table(_ratios(infer, args.model), ["size", "mode", "ms", *(f"/ {m}" for m in REPORT_COMPARE)])
    lines = [f"# Speed of {args.model} on CPU", "",
             "Written by a command; rerun it rather than editing this page:", "", f"    {command}", "",
             f"Measured {machine['date']} in {minutes:.0f} minutes" + (" (--quick: not a measurement)" if args.quick
                                                                       else "") + ".", "",
             *_md_table([{"what": k, "value": v} for k, v in machine.items()], ["what", "value"]), "",
             "All timings of a table come from one process, the contenders interleaved round-robin (one call of each "
             "per round), each figure the median of the rounds; ratios divide medians of the same round set, so a "
             "machine whose speed drifts moves every contender alike. `faults` is the median number of minor page "
             "faults of a call. Random weights, batch 1, `torch.inference_mode()`.", "",
             "## Inference", "", f"{args.model}'s median time over each other model's, same size and mode:", "",
             *summary, "", "Every row (compiled: `torch.compile(model, fullgraph=True)`, compiled once per size; "
             "`compile_s` is the first call, compilation included):", "",
             *_md_table([{**r, "compile_s": "-" if r["compile_s"] is None else r["compile_s"]} for r in infer],
                        ["model", "size", "compiled", "compile_s", "median_ms", "min_ms", "max_ms", "faults"]), "",
             f"## Training step (forward and backward, batch {train[0]['batch']}, {train_size} px, eager)", "",
             *_md_table(train, ["model", "size", "median_ms", "min_ms", "max_ms", "ratio", "faults"]), "",
             f"`ratio`: over {REPORT_COMPARE[0]}'s median.", "",
             "## The selective scan alone", "",
             "`selective_scan(backend='torch')` against the obvious per-position loop (`unbind` over positions, "
             "vectorised over batch, channels and state), K=4 directions, float32:", "",
             *_md_table(scan, ["case", "scan", "median_ms", "min_ms", "speedup", "faults"]), ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    if args.readme:
        block = [README_BEGIN, *summary, "", f"({machine['CPU']}, {machine['torch threads']} threads, torch "
                 f"{machine['torch']}, {machine['date'][:10]}; [docs/performance.md]({args.out}) has every row.)"]
        readme = Path(args.readme).read_text()   # as it is now, after the minutes of measuring
        begin, end = readme.find(README_BEGIN), readme.find(README_END)
        Path(args.readme).write_text(readme[:begin] + "\n".join(block) + "\n" + readme[end:])
        print(f"rewrote the speed table in {args.readme}")
    return 0


# ----------------------------------------------------------------------------------------
# Command line.


def _save(rows: List[Dict[str, Any]], args: argparse.Namespace) -> None:
    if args.csv:
        write_csv(args.csv, rows)
    if args.json:
        write_json(args.json, rows)


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    parser = argparse.ArgumentParser(
        prog="tools/bench.py", description="Latency of vmamba models, and of timm models with --compare, "
        "measured interleaved in one run (medians, min, max). Ratios are to the first --compare model.")
    parser.add_argument("--model", default="vmamba_tiny_s1l8", help="comma-separated zoo names")
    parser.add_argument("--sizes", default="224", help="comma-separated resolutions (default: 224)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"torch threads (default: {torch.get_num_threads()})")
    parser.add_argument("--mode", choices=("infer", "train"), default="infer",
                        help="infer: eval forward; train: forward + backward in train mode")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--compare", default=None, metavar="NAME[,NAME]", help="timm models to time alongside")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(model, fullgraph=True) of every model, compiled once "
                             "per size; the first call's seconds go in the compile_s column")
    parser.add_argument("--compile-backend", default="inductor", metavar="NAME",
                        help="torch.compile backend for --compile (default: inductor)")
    parser.add_argument("--no-scan", action="store_true",
                        help="also time each --model with its SS2D selective scans replaced by their skip "
                             "term D*x, as 'NAME (no scan)': the cost of all its other layers")
    parser.add_argument("--csv", default=None, metavar="PATH", help="also write the table as CSV")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON")
    parser.add_argument("--scan", action="store_true",
                        help="instead of models, time selective_scan(backend='torch') against a "
                             "per-position loop (CPU)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; ``argv`` defaults to the process's arguments. Returns the exit code.
    torch's thread count is set to ``--threads`` for the run and restored afterwards."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        threads = torch.get_num_threads()
        try:
            return report(argv[1:])
        finally:
            torch.set_num_threads(threads)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.scan and (args.compile or args.no_scan):
        parser.error("--compile and --no-scan time models; they do not apply to --scan")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _bench_scan(args) if args.scan else _bench_models(args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
