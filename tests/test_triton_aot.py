"""Every Triton kernel of vmamba.py compiles for real GPUs (sm_80 and sm_90), checked on a
machine without one: ``triton.compile`` runs the whole pipeline down to a cubin with the
``ptxas`` that ships with triton, for each tile configuration ``_scan_blocks`` can choose.

The interpreter (TRITON_INTERPRET=1, set by conftest.py) replaces the jit functions, so the
compilation runs in a subprocess without it: this file run as a script. By hand::

    python tests/test_triton_aot.py [--jobs N] [--fused | --scan]   # prints one JSON summary line

Coverage. The public scan's full product (95 tiles x 8 constexpr combinations x 2 targets) is
~1500 compilations, so each distinct tile is compiled once while the constexpr combination
(HAS_D, HAS_BIAS, SOFTPLUS) and the target cycle along the tiles: every tile on one target,
every combination on both targets. The tiles VMamba runs (at any size, N=1 and N=16) are also compiled on both
targets with float32, bfloat16 and float16 inputs. The fused SS2D kernels (scan, its
backward, and merge + LayerNorm) are compiled at every configuration their dispatcher chooses
for VMamba (D = 96..1536, N = 1, 4, 8 and 16, ranks 6..48, float32 and bfloat16) on both
targets (the test: the forward scan and merge as training runs them, keeping states or the merged
map, which is their inference code plus stores, one rank where dt comes from a GEMM and no float16
norms, ``--training --representative``; ``--fused`` alone: every configuration), and
must show no spill or stack bytes under ``ptxas -v``; the fused forward scan also
no barrier and no shuffle in its PTX (the backward sums over channels: it has both). The blocks'
add + LayerNorm kernels, forward and backward, at C = 48..1536, with and without the residual,
float32, bfloat16 and float16 activations, must not spill either. Registers of each are in the
summary (``fused``). Integer arguments are specialised as triton does at launch (1 becomes a
constant, multiples of 16 are marked divisible, pointers 16-byte aligned), from a real (D, N, L)
that selects the tile.
"""
import argparse
import itertools
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (80, 90)
NUM_WARPS = 4  # what every launch in vmamba.py passes
COMBOS = list(itertools.product((True, False), repeat=3))  # HAS_D, HAS_BIAS, SOFTPLUS
SHARED_MEMORY = {80: 163 * 1024, 90: 227 * 1024}  # per-block limit (A100, H100)
# Sequence lengths: the tiles change only at powers of two; these bracket every one.
LENGTHS = sorted({v for k in range(17) for v in (2 ** k - 1, 2 ** k, 2 ** k + 1) if 1 <= v <= 65536}
                 | {7 * 7, 14 * 14, 28 * 28, 56 * 56, 64 * 64, 128 * 128})


def scan_tiles(scan_blocks):
    """{(BLOCK_D, BLOCK_N, BLOCK_L): [(D, N, L) with the smallest L, ... with the largest L]}
    over D in 1..1536, N in 1..16 and the lengths above."""
    tiles = {}
    for L in LENGTHS:
        for N in range(1, 17):
            for D in range(1, 1537):
                tile = scan_blocks(D, N, L)
                examples = tiles.setdefault(tile, [(D, N, L), (D, N, L)])
                examples[1] = (D, N, L)
    return tiles


def arg_type(value):
    """Signature type and divisibility of an integer launch argument, as triton specialises it."""
    if value == 1:
        return "constexpr", False
    return ("i32" if value < 2 ** 31 else "i64"), value % 16 == 0


def scan_job(kernel, tile, shape, combo, cap, dtype="fp32", K=4):
    (block_d, block_n, block_l), (D, N, L) = tile, shape
    ints = dict(L=L, N=N, D=D, K=K, n_chunks=math.ceil(L / block_l))
    consts = dict(zip(("HAS_D", "HAS_BIAS", "SOFTPLUS"), combo), BLOCK_D=block_d, BLOCK_N=block_n,
                  BLOCK_L=block_l)
    low = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr"}  # inputs that may be bf16/fp16
    return dict(kernel=kernel, cap=cap, ints=ints, consts=consts,
                ptrs={name: dtype for name in low})


def ss2d_job(vmamba, D, N, R, cap, dtype, backward=False, save=False):
    """The fused SS2D scan as _ss2d_scan launches it for (D, N, R), activations in dtype, at H = W = 56 (``save``:
    keeping states for the backward, as in training); backward: its backward kernel as _ss2d_scan_bwd launches it,
    dy broadcast over the directions (as the merge gives it)."""
    block_d, block_n, block_r = vmamba._ss2d_blocks(D, N, R, backward)
    job = dict(kernel="_ss2d_fwd_kernel", cap=cap, ints=dict(H=56, W=56, D=D), num_warps=block_d // 32,
               consts=dict(R=R, N=N, LOW_RANK=block_r > 0, T=vmamba._SS2D_SEGMENT, SAVE=save, BLOCK_D=block_d,
                           BLOCK_N=block_n, BLOCK_R=max(block_r, 1)),
               ptrs={name: dtype for name in ("x_ptr", "proj_ptr", "dt_ptr", "y_ptr")})   # weights float32
    if backward:
        job["kernel"] = "_ss2d_bwd_kernel"
        del job["consts"]["SAVE"]
        job["ints"].update(dy_pix=D, dy_k=0)
        job["maxnreg"] = vmamba._BWD_MAXNREG
        job["ptrs"] = {name: dtype for name in ("x_ptr", "proj_ptr", "dt_ptr", "dy_ptr", "dx_ptr", "ddt_ptr")}
    return job


def merge_norm_job(vmamba, D, gated, save, cap, dtype):
    block_m, block_d = vmamba._norm_blocks(D)
    return dict(kernel="_merge_norm_kernel", cap=cap, maxnreg=vmamba._NORM_MAXNREG,
                ints=dict(rows=128 * 56 * 56, D=D, z_stride=2 * D),
                floats=("eps",), consts=dict(HAS_Z=gated, SAVE=save, BLOCK_M=block_m, BLOCK_D=block_d),
                ptrs={name: dtype for name in ("ys_ptr", "z_ptr", "out_ptr")})   # m float32


def add_norm_job(vmamba, kernel, C, has_h, cap, dtype, merge=False):
    """The block's add + LayerNorm (forward or backward) at C channels: residual stream float32, activations dtype;
    ``merge``: the backward as the merge's (s: the merged map, float32; its gradient in dtype)."""
    block_m, block_c = vmamba._norm_blocks(C)
    ints = dict(rows=128 * 56 * 56, C=C) if kernel == "_add_norm_kernel" else dict(rows=128 * 56 * 56, C=C,
                                                                                  rows_per_program=4 * block_m)
    consts = dict(HAS_H=has_h, BLOCK_M=block_m, BLOCK_C=block_c)
    names = ("dn_ptr", "dx_ptr") if merge else ("h_ptr", "n_ptr", "dn_ptr", "dh_ptr")
    return dict(kernel=kernel, cap=cap, maxnreg=vmamba._NORM_MAXNREG, ints=ints, floats=("eps",), consts=consts,
                merge=merge,
                ptrs={name: dtype for name in names})


# What the SS2D dispatcher can choose for VMamba (D = 96..1536 per direction, N = 1, 4, 8 and 16, ranks 6..48,
# float32 and bfloat16): every (BLOCK_D, BLOCK_N, BLOCK_R) tile of both scan kernels and both merge-norm variants,
# on both targets. Rank 32 is the largest made inside at N <= 4, 12 at N > 4 (BLOCK_R 16; 8 in the backward at N > 8).
SS2D_DIMS, SS2D_STATES, SS2D_RANKS = (96, 192, 384, 768, 1536), (1, 4, 8, 16), (6, 12, 24, 32, 48)
# The block norms' widths (VMamba-T/S 96..768, B 128..1024), d_inner widths up to 1536, and the stem's 48.
NORM_DIMS = (48, 96, 128, 192, 384, 768, 1024, 1536)


def fused_jobs(vmamba, inference=True, every_variant=True):
    """Every configuration of the fused kernels; without ``inference``, the forward scan and merge only as training
    runs them (keeping states / the merged map): the same code plus a store, so no more registers without it; without
    ``every_variant``, one rank where dt comes from a GEMM (there the rank only sets the projections' strides) and no
    float16 norms (they compile as bfloat16's but for their conversions)."""
    jobs, seen, saves = [], set(), (False, True) if inference else (True,)
    for cap, dtype, D, N, R, (backward, save) in itertools.product(
            TARGETS, ("fp32", "bf16"), SS2D_DIMS, SS2D_STATES, SS2D_RANKS,
            [(False, save) for save in saves] + [(True, False)]):
        blocks = vmamba._ss2d_blocks(D, N, R, backward)
        key = (cap, dtype, N, R if every_variant or blocks[2] else 0, backward, save, *blocks)   # R, N: constants
        if key not in seen:
            seen.add(key)
            jobs.append(ss2d_job(vmamba, D, N, R, cap, dtype, backward, save))
    for cap, dtype, D, gated, save in itertools.product(TARGETS, ("fp32", "bf16"), SS2D_DIMS, (False, True), saves):
        jobs.append(merge_norm_job(vmamba, D, gated, save, cap, dtype))
    for cap, D in itertools.product(TARGETS, SS2D_DIMS):   # the merge's backward (float32: as the blocks' norms')
        jobs.append(add_norm_job(vmamba, "_add_norm_bwd_kernel", D, False, cap, "bf16", merge=True))
    dtypes = ("fp32", "bf16", "fp16") if every_variant else ("fp32", "bf16")
    for cap, dtype, C, has_h, kernel in itertools.product(TARGETS, dtypes, NORM_DIMS, (False, True),
                                                          ("_add_norm_kernel", "_add_norm_bwd_kernel")):
        key = (cap, dtype, has_h, kernel, C % 16 == 0, *vmamba._norm_blocks(C))   # what the compilation depends on
        if key not in seen:
            seen.add(key)
            jobs.append(add_norm_job(vmamba, kernel, C, has_h, cap, dtype))
    return jobs


def all_jobs(vmamba, fused=True):
    tiles = scan_tiles(vmamba._scan_blocks)
    jobs = []
    for i, (tile, examples) in enumerate(sorted(tiles.items())):
        combo, cap = COMBOS[i % len(COMBOS)], TARGETS[(i // len(COMBOS)) % len(TARGETS)]
        jobs.append(scan_job("_scan_fwd_kernel", tile, examples[i % 2], combo, cap, K=4 if i % 3 else 1))
    for cap, (D, N, L), dtype in itertools.product(TARGETS, [(192, 1, 3136), (192, 16, 3136)], ("fp32", "bf16", "fp16")):
        jobs.append(scan_job("_scan_fwd_kernel", vmamba._scan_blocks(D, N, L), (D, N, L), COMBOS[0], cap, dtype))
    return jobs + (fused_jobs(vmamba) if fused else []), len(tiles)


def _init_worker():
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    import vmamba
    vmamba._triton_kernels()  # imports triton and jits the kernels (done lazily on first use)


FUSED = ("_ss2d_fwd_kernel", "_ss2d_bwd_kernel", "_merge_norm_kernel", "_add_norm_kernel",
         "_add_norm_bwd_kernel")   # the kernels that must not spill


def resources(ptx, cap):
    """Registers, spill and stack bytes per thread from the ptxas that ships with triton (``ptxas -v``), and the
    barriers and shuffles in the PTX."""
    import re
    import tempfile
    import triton
    ptxas = os.environ.get("TRITON_PTXAS_PATH") or str(Path(triton.__file__).parent / "backends/nvidia/bin/ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        arch = f"sm_{cap}a" if cap == 90 else f"sm_{cap}"
        log = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(path), "-o", os.devnull],
                             capture_output=True, text=True).stderr
    number = lambda pattern: sum(int(v) for v in re.findall(pattern, log))
    return dict(registers=number(r"Used (\d+) registers"), stack=number(r"(\d+) bytes stack frame"),
                spill_bytes=number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
                barriers=len(re.findall(r"\bbar\.sync|\bbarrier\.sync", ptx)),
                shuffles=len(re.findall(r"\bshfl\.", ptx)))


def compile_job(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import vmamba
    kernel = getattr(vmamba._triton_kernels(), job["kernel"].strip("_"))
    signature, constexprs, attrs = {}, dict(job["consts"]), {}
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + job["ptrs"].get(name, "fp32")
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in job.get("floats", ()):
            signature[name] = "fp32"
        else:
            signature[name], divisible = arg_type(job["ints"][name])
            if signature[name] == "constexpr":
                constexprs[name] = job["ints"][name]
            elif divisible:
                attrs[(index,)] = [["tt.divisibility", 16]]
    start = time.perf_counter()
    result = dict(job, ok=False, error=None)
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", job["cap"], 32),
                                  options={"num_warps": job.get("num_warps", NUM_WARPS),   # as vmamba launches
                                           "maxnreg": job.get("maxnreg")})
        cubin, shared = compiled.asm.get("cubin"), compiled.metadata.shared
        result.update(cubin_bytes=len(cubin or b""), shared=shared, **resources(compiled.asm["ptx"], job["cap"]))
        if not cubin:
            result["error"] = "no cubin produced"
        elif shared > SHARED_MEMORY[job["cap"]]:
            result["error"] = f"needs {shared} bytes of shared memory"
        elif job["kernel"] in FUSED and (result["spill_bytes"] or result["stack"]):
            result["error"] = f"spills: {result['spill_bytes']} bytes, stack {result['stack']} bytes"
        elif job["kernel"] == "_ss2d_fwd_kernel" and (result["barriers"] or result["shuffles"]):
            result["error"] = f"{result['barriers']} barriers and {result['shuffles']} shuffles in the PTX"
        else:
            result["ok"] = True
    except Exception as exc:  # a compiler error is a result, reported with its job
        result["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def write_markdown(path, fused, triton_version, ptxas_version, argv):
    """The fused kernels' registers and spills, one row per configuration, as a page for docs/."""
    import datetime
    command = "python tests/test_triton_aot.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["# Registers of the fused kernels (sm_80, sm_90)", "",
             f"`{command}` on {datetime.date.today()}: triton {triton_version}, ptxas {ptxas_version} (`ptxas -v` on "
             "the PTX triton generates, with the register caps vmamba launches them with: 255 for the backward "
             "scan, 128 for the norm kernels; no GPU involved). One row per configuration the dispatcher can "
             "choose for VMamba (D = 96..1536, N = 1, 4, 8 and 16, ranks 6..48, float32 and bfloat16 activations),"
             " and for the blocks' add + LayerNorm kernels (C = 48..1536, residual stream float32, activations "
             "float32, bfloat16 or float16) and the merge's backward on the same kernel (merge: the float32 merged"
             " map in, its gradient out in the activations' dtype). SAVE: as training runs the forward kernels "
             "(keeping states or the merged map).", "",
             "| kernel | sm | dtype | R | N | LOW_RANK | SAVE | HAS_Z / HAS_H | C | BLOCK_D / BLOCK_C | BLOCK_M | "
             "registers | spill bytes |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(fused, key=lambda r: (r["kernel"], r["sm"], r["dtype"], r.get("N", 0), r.get("R", 0),
                                          r.get("C", 0), r.get("BLOCK_D", 0), r.get("HAS_Z", r.get("HAS_H")),
                                          r.get("SAVE", False))):
        lines.append(f"| {r['kernel']} | {r['sm']} | {r['dtype']} | {r.get('R', '')} | {r.get('N', '')} | "
                     f"{r.get('LOW_RANK', '')} | {r.get('SAVE', '')} | {r.get('HAS_Z', r.get('HAS_H', ''))} | "
                     f"{r.get('C', '')} | "
                     f"{r.get('BLOCK_D', r.get('BLOCK_C'))} | {r.get('BLOCK_M', '')} | "
                     f"{r['registers']} | {r['spill_bytes']} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fused", action="store_true", help="only the fused SS2D kernels (a few minutes)")
    parser.add_argument("--scan", action="store_true", help="only the public scan's kernel (its tiles)")
    parser.add_argument("--training", action="store_true",
                        help="the fused forward kernels only as training runs them (see fused_jobs)")
    parser.add_argument("--representative", action="store_true",
                        help="the fused kernels' representative configurations (see fused_jobs; the CI test)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the fused kernels' resources here")
    args = parser.parse_args(argv)
    _init_worker()
    import triton

    import vmamba
    start = time.perf_counter()
    # the assembler triton runs (it ships one; TRITON_PTXAS_PATH overrides it)
    ptxas = os.environ.get("TRITON_PTXAS_PATH") or str(Path(triton.__file__).parent / "backends/nvidia/bin/ptxas")
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=True).stdout
    jobs, n_tiles = ((fused_jobs(vmamba, not args.training, not args.representative), 0) if args.fused
                     else all_jobs(vmamba, not args.scan))
    jobs.sort(key=lambda job: job["kernel"] != "_ss2d_bwd_kernel")  # the slowest first
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=_init_worker,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(compile_job, jobs))
    failed = [r for r in results if not r["ok"]]
    compiled = {f"sm_{cap}": {kind: sum(r["ok"] and r["cap"] == cap and (r["kernel"] in FUSED) == fused
                                        for r in results)
                              for kind, fused in (("scan", False), ("fused", True))}
                for cap in TARGETS}
    fused = [dict(kernel=r["kernel"] + (" (merge)" if r.get("merge") else ""), sm=r["cap"],
                  dtype=sorted(set(r["ptrs"].values()))[0],
                  **{k: v for k, v in r["consts"].items() if k.startswith(("BLOCK", "LOW", "HAS", "R", "N", "SAVE"))},
                  **({"C": r["ints"]["C"]} if "C" in r["ints"] else {}),
                  registers=r.get("registers"), spill_bytes=r.get("spill_bytes"))
             for r in results if r["kernel"] in FUSED]
    if args.markdown:
        write_markdown(args.markdown, fused, triton.__version__, version.strip().splitlines()[-1], argv)
    print(json.dumps(dict(
        triton=triton.__version__, ptxas=f"{ptxas}: {version.strip().splitlines()[-1]}", tiles=n_tiles,
        jobs=len(jobs), compiled=compiled, failed=failed, fused=fused,
        slowest=sorted(results, key=lambda r: -r["seconds"])[:3],
        seconds=round(time.perf_counter() - start, 1))))
    return 1 if failed else 0


# --- the test (pytest collects this file; the work happens in the subprocess above)

try:
    import pytest
except ImportError:  # run as a script without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.triton
    def test_the_public_scan_kernel_compiles_for_sm80_and_sm90(tmp_path):
        """Every tile of the public scan's kernel (--scan); the fused kernels: the test below."""
        pytest.importorskip("triton", reason="triton is not installed")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # really compile, every time
        proc = subprocess.run([sys.executable, __file__, "--scan"], env=env, capture_output=True, text=True,
                              timeout=1800)
        lines = proc.stdout.strip().splitlines()
        assert lines, f"no output (status {proc.returncode}):\n{proc.stderr[-4000:]}"
        summary = json.loads(lines[-1])
        failures = "\n".join(f"{r['kernel']} sm_{r['cap']} {r['consts']} {r['ints']}: {r['error']}"
                             for r in summary["failed"][:10])
        assert proc.returncode == 0 and not summary["failed"], (
            f"{len(summary['failed'])} of {summary['jobs']} compilations failed:\n{failures}")
        print(f"compiled {summary['jobs']} kernels ({summary['tiles']} scan tiles): {summary['compiled']} "
              f"in {summary['seconds']} s")
        assert summary["tiles"] > 1 and all(n["scan"] and not n["fused"] for n in summary["compiled"].values())

    @pytest.mark.triton
    def test_fused_kernels_compile_without_spills(tmp_path):
        """The fused SS2D kernels alone (a few minutes): see the module docstring."""
        pytest.importorskip("triton", reason="triton is not installed")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
        proc = subprocess.run([sys.executable, __file__, "--fused", "--training", "--representative"], env=env,
                              capture_output=True,
                              text=True, timeout=900)
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert proc.returncode == 0 and not summary["failed"], summary["failed"][:5]
        kernels = {(r["kernel"].split()[0], r["sm"]) for r in summary["fused"]}   # "(merge)": the merge's backward
        assert kernels == {(k, cap) for k in FUSED for cap in TARGETS}
        assert all(r["spill_bytes"] == 0 and 0 < r["registers"] <= 255 for r in summary["fused"])


if __name__ == "__main__":
    sys.exit(main())
