#!/usr/bin/env python
"""One-process check of vmamba on a CUDA GPU: correctness, torch.compile, throughput.

    python tools/gpu_check.py [--out DIR] [--budget SECONDS]
    python tools/gpu_check.py --small     # the same code paths on CPU, tiny sizes
    python tools/gpu_check.py --sections families,compile,throughput,profile --modes infer_bf16,train_bf16 \
        --baseline old/vmamba.py          # also time another vmamba.py side by side (an A/B of two versions)

--small (alias --dry-run) runs every section on CPU with the Triton kernels interpreted
(TRITON_INTERPRET=1), at tiny sizes: state size at most 2 in the family models, one zoo
model beside convnext_tiny, and torch.compile's "aot_eager" backend. It exercises the
script; its numbers mean nothing.

1. Correctness at VMamba-T sizes, float32 and bfloat16 inputs: selective_scan with the
   triton and torch backends against the float64 selective_scan_ref (y, last state and the
   gradients of every input); SS2D layers at VMamba-T's stage shapes on the fused Triton path
   (the scan reading the map in place, D term included; merge, out_norm and gate in one kernel) against
   the torch backend (output and all gradients); one small model of each zoo family, forward
   and backward, triton against torch on the same weights (logits in float32; logits and every
   weight gradient in a float64 copy of the model, where only the scans round to float32).
2. torch.compile(vmamba_tiny_s1l8(), fullgraph=True) against eager: inference, and a bfloat16
   training step at batch 2, then 3 (the batch becomes dynamic), loss and gradients.
3. Throughput at batch 128, 224 px, eager and compiled: vmamba_tiny_s1l8 and
   vmamba_small_s1l20 (triton, and mamba_ssm when it is installed) beside timm's
   swin_tiny_patch4_window7_224 and convnext_tiny; inference in float32 (TF32 on) and
   bfloat16 autocast, and a bfloat16 training step (forward, backward, SGD step). Medians
   of interleaved repeats after warm-up. Whatever would not fit in the time budget is
   skipped with a note; a watchdog ends the run at budget + 20 s whatever it is doing.
   With --baseline PATH, the zoo models of that other vmamba.py are timed too (eager), in the
   same interleaved rounds ("NAME (baseline)"), so that two versions compare within one run.
   Training memory per image, eager (CUDA only): what the forward keeps for the backward
   (allocated after the forward, less before it) and the step's peak above its start.
4. --profile (section "profile"): the CUDA kernels of the first zoo model's eager bfloat16
   inference and training step, by the torch profiler: the top kernels by GPU time.
   The bytes the first zoo model's eager bfloat16 step should move (tools/bytes_model.py) are
   noted beside the timings, for the fused path and the one before it.
5. Writes gpu_check.json and gpu_check.md to --out (default gpu_check_out/) and prints the
   tables. Exit status: 0 when every correctness check passed, 1 when one failed, 2 when
   there is no CUDA device (and --small was not given). Tolerances are those of the CPU
   tests of the kernels: 1e-5 on outputs, 1e-4 on gradients, 1e-2 with bfloat16 inputs,
   as max |error| / max |reference|. Default budget 450 s (--budget).

Needs torch, triton, timm and numpy; uses vmamba's public API only.
"""
import argparse
import inspect
import json
import logging
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = ("gpu_check: no CUDA device (torch.cuda.is_available() is False). This script checks "
           "vmamba on a GPU; run it on a CUDA machine, or with --small to exercise it on CPU.")

# Tolerances: those of the CPU tests of the Triton kernels (tests/test_triton.py), as
# max |error| / max |reference|.
TOL = {"y32": 1e-5, "grad32": 1e-4, "low": 1e-2, "exact": 0.0}

FAMILIES = ("vanilla_vmamba_tiny", "vmamba_tiny_s2l5", "vmamba_tiny_s1l8")
ZOO = ("vmamba_tiny_s1l8", "vmamba_small_s1l20")
MODES = ("infer_fp32_tf32", "infer_bf16", "train_bf16")
SECTIONS = ("scan", "ss2d", "families", "compile", "throughput")

FULL = dict(
    # (batch, K, D, N, L, with the gate z): stage 1 and stage 3 of VMamba-T
    scan=[(2, 4, 192, 1, 56 * 56, False), (2, 4, 192, 16, 56 * 56, False), (2, 4, 96, 1, 56 * 56, False),
          (2, 4, 96, 16, 56 * 56, False), (2, 4, 384, 1, 14 * 14, True), (2, 4, 384, 16, 14 * 14, True)],
    # (forward type, N, ssm_ratio, batch, H, W, C): VMamba-T stages; dt made in the kernel (ranks 6, 24) or by a GEMM (48)
    ss2d=[("v05_noz", 1, 1.0, 2, 56, 56, 96), ("v0", 16, 2.0, 2, 56, 56, 96), ("v05_noz", 1, 1.0, 2, 14, 14, 384),
          ("v05_noz", 1, 1.0, 2, 7, 7, 768)],
    family_arch=dict(depths=[1, 1, 2, 1], dims=32), family_input=(2, 3, 224, 224), max_state=16,
    families=FAMILIES, compile_input=(2, 3, 224, 224), zoo=ZOO, zoo_arch={},
    batch=128, img=224, timm={"swin_tiny_patch4_window7_224": {}, "convnext_tiny": {}},
    warmup=3, repeats=5, iters=3, budget=450.0, eager_s=10.0, compile_backend="inductor",
)
SMALL = dict(
    scan=[(1, 4, 2, 1, 37, False), (1, 4, 3, 4, 21, True), (1, 2, 2, 2, 21, False)],
    ss2d=[("v05_noz", 1, 1.0, 1, 5, 7, 4), ("v0", 2, 2.0, 1, 5, 7, 4)],
    family_arch=dict(depths=[1, 1], dims=[4, 4]), family_input=(1, 3, 16, 16), max_state=2,
    families=FAMILIES[::2], compile_input=(1, 3, 16, 16),
    zoo=ZOO[:1], zoo_arch=dict(depths=[1, 1], dims=[4, 4]),
    batch=1, img=32, timm={"convnext_tiny": dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))},
    warmup=1, repeats=2, iters=1, budget=60.0, eager_s=2.0, compile_backend="aot_eager",
)


class Run:
    """Results so far, the time budget, and writing them out (also from the watchdog)."""

    def __init__(self, out: Path, budget: float, info: dict):
        self.out, self.budget, self.info = out, budget, info
        self.checks, self.bench, self.notes = [], [], []
        self.section = "setup"
        self.lock = threading.RLock()

    def left(self) -> float:
        return self.budget - (time.perf_counter() - START)

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        with self.lock:
            self.notes.append(text)

    def check(self, name: str, parts: dict, seconds: float) -> None:
        """parts: {what: (error, tolerance)}; passes when every error is within its tolerance."""
        worst = max(parts, key=lambda k: parts[k][0] / max(parts[k][1], 1e-30) if parts[k][0] else 0.0)
        ok = all(err <= tol for err, tol in parts.values())
        row = dict(name=name, ok=ok, worst=worst, error=parts[worst][0], tol=parts[worst][1],
                   parts={k: dict(error=e, tol=t) for k, (e, t) in parts.items()}, seconds=round(seconds, 2))
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {worst} {parts[worst][0]:.2e} (tol {parts[worst][1]:.0e})",
              flush=True)
        with self.lock:
            self.checks.append(row)

    def failed(self, name: str, exc: BaseException) -> None:
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        print(f"FAIL {name}: {text}", flush=True)
        if exc.__traceback__ is not None:
            traceback.print_exception(exc, file=sys.stdout)
        with self.lock:
            self.checks.append(dict(name=name, ok=False, worst="exception", error=None, tol=None,
                                    exception=text[-2000:], seconds=None))

    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def markdown(self) -> str:
        lines = [f"# vmamba GPU check: {self.info.get('device')}", "",
                 f"torch {self.info.get('torch')}, triton {self.info.get('triton')}, "
                 f"backends {self.info.get('backends')}, {time.perf_counter() - START:.0f} s", "",
                 "| check | worst part | max rel. error | tolerance | result |", "|---|---|---|---|---|"]
        for c in self.checks:
            err = "-" if c["error"] is None else f"{c['error']:.2e}"
            tol = "-" if c["tol"] is None else f"{c['tol']:.0e}"
            lines.append(f"| {c['name']} | {c['worst']} | {err} | {tol} | {'ok' if c['ok'] else '**FAIL**'} |")
        lines += ["", "| model | backend | mode | eager img/s | compiled img/s | compile s | train MiB/img: saved, peak |",
                  "|---|---|---|---|---|---|---|"]
        rows = {}
        for b in self.bench:
            rows.setdefault((b["model"], b["backend"], b["mode"]), {})[b["compiled"]] = b
        fmt = lambda b: "-" if b is None or b.get("img_per_s") is None else f"{b['img_per_s']:.0f}"
        for (model, backend, mode), r in rows.items():
            comp = r.get(True)
            secs = "-" if comp is None or comp.get("compile_s") is None else f"{comp['compile_s']:.0f}"
            eager = r.get(False) or {}
            mem = f"{eager['saved_mib_per_img']:.1f}, {eager['peak_mib_per_img']:.1f}" if "saved_mib_per_img" in eager \
                else "-"
            lines.append(f"| {model} | {backend} | {mode} | {fmt(r.get(False))} | {fmt(comp)} | {secs} | {mem} |")
        for title, rows in self.info.get("profile", {}).items():
            lines += ["", f"Kernels of {title} (GPU time per step, top {len(rows)}):", "",
                      "| kernel | ms per step | share | calls per step |", "|---|---|---|---|"]
            lines += [f"| {r['kernel'][:90]} | {r['ms']:.2f} | {r['share']:.1%} | {r['calls']:g} |" for r in rows]
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        with self.lock:
            self.out.mkdir(parents=True, exist_ok=True)
            data = dict(info=self.info, ok=self.ok(), seconds=round(time.perf_counter() - START, 1),
                        checks=self.checks, throughput=self.bench, notes=self.notes)
            (self.out / "gpu_check.json").write_text(json.dumps(data, indent=1))
            (self.out / "gpu_check.md").write_text(self.markdown())

    def finish(self) -> int:
        self.write()
        print("\n" + self.markdown(), flush=True)
        print(f"wrote {self.out / 'gpu_check.json'} and {self.out / 'gpu_check.md'}", flush=True)
        return 0 if self.ok() else 1


# ----------------------------------------------------------------------------------------
# 1. Correctness

def rel_err(got, ref) -> float:
    if got is None or ref is None:
        return float("inf") if (got is None) != (ref is None) else 0.0
    ref = ref.detach().double()
    err = ((got.detach().double() - ref).abs().max() / (ref.abs().max() + 1e-30)).item()
    return err if err == err else float("inf")  # NaN fails


def scan_inputs(torch, b, k, d, n, l, dtype, device, seed=0):
    """VMamba-like inputs: A = -(1..N), dt = softplus(delta + bias) around 0.001..0.1."""
    g = torch.Generator().manual_seed(seed)
    kd = k * d
    t = dict(u=torch.randn(b, kd, l, generator=g), delta=0.5 * torch.randn(b, kd, l, generator=g),
             A=-torch.arange(1, n + 1).float().repeat(kd, 1) * (0.5 + torch.rand(kd, n, generator=g)),
             B=torch.randn(b, k, n, l, generator=g), C=torch.randn(b, k, n, l, generator=g),
             D=torch.randn(kd, generator=g), z=torch.randn(b, kd, l, generator=g),
             delta_bias=torch.log(torch.expm1(torch.rand(kd, generator=g) * 0.099 + 0.001)))
    low = {"u", "delta", "B", "C", "z"}  # what a model under autocast hands over in bfloat16
    return {name: v.to(device=device, dtype=dtype if name in low else torch.float32).requires_grad_()
            for name, v in t.items()}


def check_scans(run, torch, vmamba, cfg, device):
    for (b, k, d, n, l, use_z) in cfg["scan"]:
        for dtype in (torch.float32, torch.bfloat16):
            low = dtype != torch.float32
            inputs = scan_inputs(torch, b, k, d, n, l, dtype, device)
            names = [x for x in inputs if use_z or x != "z"]
            ref_in = {x: inputs[x].detach().double().requires_grad_() for x in names}

            def call(fn, t, **kw):
                return fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], z=t.get("z"),
                          delta_bias=t["delta_bias"], delta_softplus=True, return_last_state=True, **kw)

            start = time.perf_counter()
            y_ref, last_ref = call(vmamba.selective_scan_ref, ref_in)
            dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
            ref_grads = torch.autograd.grad(y_ref, [ref_in[x] for x in names], dy.double())
            ref_s = time.perf_counter() - start
            for backend in ("triton", "torch"):
                name = f"scan {backend} {str(dtype)[6:]} B{b} K{k} D{d} N{n} L{l}{' z' if use_z else ''}"
                try:
                    start = time.perf_counter()
                    y, last = call(vmamba.selective_scan, {x: inputs[x] for x in names}, backend=backend)
                    grads = torch.autograd.grad(y, [inputs[x] for x in names], dy)
                    parts = {"y": (rel_err(y, y_ref), TOL["low"] if low else TOL["y32"]),
                             "last_state": (rel_err(last, last_ref), TOL["y32"])}
                    if y.dtype != dtype:
                        parts["y dtype"] = (1.0, 0.0)
                    for x, g, r in zip(names, grads, ref_grads):
                        parts[f"grad {x}"] = (rel_err(g, r), TOL["low"] if low else TOL["grad32"])
                    run.check(name, parts, time.perf_counter() - start + ref_s)
                except Exception as exc:
                    run.failed(name, exc)
            del y_ref, ref_grads, ref_in


def check_ss2d(run, torch, vmamba, cfg, device):
    """One SS2D layer per shape, its fused Triton path (scan reading the map in place, D term included, then
    merge, out_norm and gate in one kernel) against the torch backend on the same weights: output, and the gradients of
    the input and of every parameter. bfloat16 under autocast, where the fused path rounds each direction's
    output to bfloat16 before the merge: 3e-2 on the output, 5e-2 on gradients."""
    for forward_type, n, ratio, b, h, w, c in cfg["ss2d"]:
        for dtype in (torch.float32, torch.bfloat16):
            low = dtype != torch.float32
            name = f"SS2D fused {forward_type} N{n} {str(dtype)[6:]} (B, H, W, C) = {(b, h, w, c)}"
            try:
                start = time.perf_counter()
                torch.manual_seed(0)
                layer = vmamba.SS2D(d_model=c, d_state=n, ssm_ratio=ratio, forward_type=forward_type).to(device)
                x = torch.randn(b, h, w, c, device=device)
                res = {}
                for backend in ("triton", "torch"):
                    layer.backend = backend
                    xi = x.clone().requires_grad_()
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
                        out = layer(xi)
                    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, out.dtype)
                    res[backend] = (out, torch.autograd.grad(out, [xi, *layer.parameters()], g))
                (out, grads), (ref, ref_grads) = res["triton"], res["torch"]
                parts = {"y": (rel_err(out, ref), 3e-2 if low else TOL["y32"])}
                if out.dtype != ref.dtype:
                    parts["y dtype"] = (1.0, 0.0)
                for pname, got, want in zip(["x"] + [k for k, _ in layer.named_parameters()], grads, ref_grads):
                    parts[f"grad {pname}"] = (rel_err(got, want), 5e-2 if low else TOL["grad32"])
                run.check(name, parts, time.perf_counter() - start)
            except Exception as exc:
                run.failed(name, exc)


def check_families(run, torch, vmamba, cfg, device):
    """Triton against torch on one small model per zoo family, same weights. The weight
    gradients are compared in a float64 model (the scans still run in float32) because in
    float32 the first layers' gradients, sums with much cancellation, differ at ~3e-4
    between any two float32 evaluations (both backends are that far from float64)."""
    seen = []
    for zoo_name in cfg["families"]:
        family = {k: v for k, v in vmamba.model_config(zoo_name).items()
                  if k not in ("depths", "dims", "drop_path_rate")}
        family["ssm_d_state"] = min(family["ssm_d_state"], cfg["max_state"])
        if family in seen:
            continue
        seen.append(family)
        name = f"model {zoo_name} family {cfg['family_arch']} fwd+bwd"
        try:
            start = time.perf_counter()
            parts = {}
            for dtype in (torch.float32, torch.float64):
                torch.manual_seed(0)
                model = vmamba.VSSM(**cfg["family_arch"], **family).to(device, dtype).eval()
                x = torch.randn(cfg["family_input"], device=device, dtype=dtype)
                params = dict(model.named_parameters())
                res = {}
                for backend in ("triton", "torch"):
                    vmamba.set_backend(backend)
                    out = model(x)
                    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
                    res[backend] = (out.detach(), torch.autograd.grad(out, list(params.values()), g))
                bits = str(dtype)[-2:]
                parts[f"logits f{bits}"] = (rel_err(res["triton"][0], res["torch"][0]), TOL["grad32"])
                if dtype == torch.float64:
                    worst, where = max((rel_err(a, b), n) for a, b, n in zip(*[res[k][1] for k in res], params))
                    parts[f"grad {where} f64"] = (worst, TOL["grad32"])
            run.check(name, parts, time.perf_counter() - start)
        except Exception as exc:
            run.failed(name, exc)
        finally:
            vmamba.set_backend(None)


# ----------------------------------------------------------------------------------------
# 2. torch.compile(fullgraph=True) of a zoo model against eager

def compile_model(torch, model, **kwargs):
    """torch.compile, with recompilations counted per call where this torch can (one
    model's recompilations must not use up another's limit and fall back to eager)."""
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        kwargs.update(isolate_recompiles=True, recompile_limit=16)
    return torch.compile(model, **kwargs)


class RecompileLimitNotes(logging.Handler):
    """Turns dynamo's 'hit the recompile limit' warnings (that code runs eagerly from then
    on) into notes of the run."""

    def __init__(self, run):
        super().__init__(logging.WARNING)
        self.run = run

    def emit(self, record):
        message = record.getMessage()
        if "recompile_limit" in message or "cache_size_limit" in message:
            self.run.note(f"during {self.run.section}: {message.splitlines()[0]} {message.splitlines()[1:2]}")


def check_compile(run, torch, vmamba, cfg, device):
    name = f"torch.compile(vmamba_tiny_s1l8, fullgraph=True, backend={cfg['compile_backend']}) vs eager"
    try:
        start = time.perf_counter()
        torch.manual_seed(0)
        model = vmamba.vmamba_tiny_s1l8(**cfg["zoo_arch"]).to(device).eval()
        x = torch.randn(cfg["compile_input"], device=device)
        vmamba.set_backend("triton")
        compiled = compile_model(torch, model, fullgraph=True, backend=cfg["compile_backend"])
        with torch.no_grad():
            eager = model(x)
            got = compiled(x)
            compile_s = time.perf_counter() - start
            got = compiled(x)  # the cached graph
        run.check(name, {"logits": (rel_err(got, eager), TOL["grad32"])}, time.perf_counter() - start)
        run.info["compile_s"] = round(compile_s, 1)
        run.note(f"fullgraph compile of vmamba_tiny_s1l8 took {compile_s:.0f} s")
    except Exception as exc:
        run.failed(name, exc)
    finally:
        vmamba.set_backend(None)
    check_compiled_training(run, torch, vmamba, cfg, device)


def check_compiled_training(run, torch, vmamba, cfg, device):
    """A bfloat16 training step of a small VMamba-T (family_arch: compiling is what is checked)
    compiled at batch 2, then 3 (torch.compile makes the batch dynamic on the second size),
    against eager at batch 3: loss and every weight gradient
    (no drop path, so both draw no random numbers; bfloat16 rounding differs where inductor
    fuses, hence twice the bfloat16 tolerance)."""
    name = f"compiled bf16 training step, batch 2 then 3 (dynamic), backend={cfg['compile_backend']} vs eager"
    try:
        start = time.perf_counter()
        torch.manual_seed(0)
        model = vmamba.vmamba_tiny_s1l8(**dict(cfg["family_arch"], drop_path_rate=0.0)).to(device).train()
        params = list(model.parameters())
        vmamba.set_backend("triton")
        torch.compiler.reset()
        compiled = compile_model(torch, model, fullgraph=True, backend=cfg["compile_backend"])
        results = []
        for m, batches in ((compiled, (2, 3)), (model, (3,))):
            for b in batches:
                x = torch.randn(b, *cfg["compile_input"][1:], generator=torch.Generator().manual_seed(b)).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = m(x).float().square().mean()
                grads = torch.autograd.grad(loss, params)
            results.append((loss, torch.cat([g.float().flatten() for g in grads])))
        (loss, grads), (loss_ref, grads_ref) = results
        run.check(name, {"loss": (rel_err(loss, loss_ref.double()), 2 * TOL["low"]),
                         "gradients": (rel_err(grads, grads_ref.double()), 2 * TOL["low"])},
                  time.perf_counter() - start)
    except Exception as exc:
        run.failed(name, exc)
    finally:
        vmamba.set_backend(None)
        torch.compiler.reset()


# ----------------------------------------------------------------------------------------
# 3. Throughput

class Entry:
    def __init__(self, label, backend, build, module=None):
        self.label, self.backend, self.build, self.module = label, backend, build, module
        self.model = self.opt = None


def make_step(torch, F, vmamba, entry, model, mode, x, target):
    device_type = x.device.type

    def use_backend():
        if entry.backend != "timm":
            (entry.module or vmamba).set_backend(entry.backend)

    if mode == "train_bf16":
        def step():
            use_backend()
            entry.opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            entry.opt.step()
    else:
        low = mode == "infer_bf16"

        def step():
            use_backend()
            with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=low):
                model(x)
    return step


def timed(torch, fn, iters, cuda):
    """Seconds per call of fn, over iters calls."""
    if cuda:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000.0 / iters
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def prepare(run, torch, entry, mode, step, compiled, cuda, cfg):
    """Warm up one (entry, mode), compiling when compiled, then time one step.
    Returns (warm-up seconds, seconds per step), or None when it fails."""
    start = time.perf_counter()
    try:
        for _ in range(cfg["warmup"]):
            step()
        if cuda:
            torch.cuda.synchronize()
        warm_s = time.perf_counter() - start
        return warm_s, timed(torch, step, 1, cuda)
    except Exception as exc:
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-500:]
        run.note(f"{entry.label} ({entry.backend}) {mode} {'compiled' if compiled else 'eager'}: failed: {text}")
        return None


def train_memory(torch, F, entry, model, step, x, target):
    """MiB per image of an eager bfloat16 training step (CUDA): kept by the forward for the
    backward, and the step's peak above what was allocated when it began."""
    try:
        step()  # sets the backend; the optimizer's state exists from here on
    except Exception as exc:  # timing will report it
        return dict(memory_error=f"{type(exc).__name__}: {exc}"[:300])
    entry.opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), target)
    saved = torch.cuda.memory_allocated() - base
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - base
    entry.opt.zero_grad(set_to_none=True)
    mib = 2.0 ** 20 * x.shape[0]
    return dict(saved_mib_per_img=saved / mib, peak_mib_per_img=peak / mib)


def bench(run, torch, F, vmamba, cfg, device):
    import timm
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for float32 matmuls and convolutions
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    backends = ["triton"] + (["mamba_ssm"] if "mamba_ssm" in vmamba.available_backends(device) else [])
    entries = [Entry(name, backend, lambda name=name: getattr(vmamba, name)(**cfg["zoo_arch"]))
               for backend in backends for name in cfg["zoo"]]
    if cfg.get("baseline") is not None:  # the other version's models, same weights (same seed, same layout)
        base = cfg["baseline"]
        entries += [Entry(f"{name} (baseline)", "triton", lambda name=name: getattr(base, name)(**cfg["zoo_arch"]),
                          module=base) for name in cfg["zoo"]]
    entries += [Entry(name, "timm", lambda name=name, kw=kw: timm.create_model(name, **kw))
                for name, kw in cfg["timm"].items()]
    # What the targets compare comes first (VMamba-T against Swin-T), so that a short budget
    # still measures it: the larger zoo models go last.
    entries.sort(key=lambda e: e.label.split(" (")[0] in cfg["zoo"][1:])
    x = torch.randn(cfg["batch"], 3, cfg["img"], cfg["img"], device=device)
    target = torch.randint(0, 1000, (cfg["batch"],), device=device)
    models = {}
    for e in entries:  # one set of weights per architecture, shared by its backends
        if e.label not in models:
            torch.manual_seed(0)
            models[e.label] = e.build().to(device)
        e.model = models[e.label]
        e.opt = torch.optim.SGD(e.model.parameters(), lr=1e-4, momentum=0.9)

    # Expected compile seconds per model and mode; refined by every compile that runs.
    first = run.info.get("compile_s") or (90.0 if cuda else 10.0)
    guess = {ZOO[0]: first, ZOO[1]: 2 * first}
    for compiled, modes in ((False, MODES), (True, ("infer_bf16", "train_bf16", "infer_fp32_tf32"))):
        for mode in (m for m in modes if m in cfg["modes"]):
            run.section = f"throughput {mode} {'compiled' if compiled else 'eager'}"
            if compiled:  # each mode compiles from a clean slate (no recompile limits, no shapes seen before)
                torch.compiler.reset()
            ready = []
            for e in entries:
                factor = 2.5 if mode == "train_bf16" else 1.0
                if compiled and e.module is not None:
                    continue  # a baseline is timed eager only: its compilations would take the budget
                need = 1.3 * factor * guess.get(e.label, 60.0 if cuda else 10.0) if compiled else cfg["eager_s"]
                if run.left() < need:
                    run.note(f"skipped {e.label} ({e.backend}) {mode} {'compiled' if compiled else 'eager'}: "
                             f"{run.left():.0f} s left, it may take ~{need:.0f} s")
                    continue
                # Compiled afresh for each mode, with static shapes: a benchmark's graph, not one made
                # dynamic by earlier calls.
                model = compile_model(torch, e.model, backend=cfg["compile_backend"], dynamic=False) \
                    if compiled else e.model
                model.train(mode == "train_bf16")
                step = make_step(torch, F, vmamba, e, model, mode, x, target)
                got = prepare(run, torch, e, mode, step, compiled, cuda, cfg)
                if got is not None:
                    if compiled:
                        guess[e.label] = max(guess.get(e.label, 0.0), got[0] / factor)
                    memory = train_memory(torch, F, e, model, step, x, target) \
                        if cuda and mode == "train_bf16" and not compiled else {}
                    ready.append(dict(entry=e, step=step, samples=[], warm_s=got[0], per_step=got[1], memory=memory))
            # Interleaved repeats: one sample of every entry per round, while time allows.
            for r in range(cfg["repeats"]):
                round_s = sum(item["per_step"] for item in ready) * cfg["iters"]
                if run.left() < round_s + 5:
                    if ready:
                        run.note(f"{run.section}: stopped after {r} of {cfg['repeats']} repeats (time budget)")
                    break
                for item in ready:
                    if item.get("failed"):
                        continue
                    try:
                        item["samples"].append(timed(torch, item["step"], cfg["iters"], cuda))
                    except Exception as exc:
                        run.note(f"{item['entry'].label} {mode}: failed while timing: {exc}")
                        item["failed"] = True
            for item in ready:
                e, samples = item["entry"], item["samples"]
                med = statistics.median(samples) if samples else None
                row = dict(model=e.label, backend=e.backend, mode=mode, compiled=compiled,
                           batch=cfg["batch"], img=cfg["img"], samples_s=samples,
                           ms_per_step=None if med is None else med * 1e3,
                           img_per_s=None if med is None else cfg["batch"] / med,
                           compile_s=round(item["warm_s"], 1) if compiled else None, **item["memory"])
                with run.lock:
                    run.bench.append(row)
                rate = "-" if med is None else f"{row['img_per_s']:.1f} img/s"
                print(f"{e.label:30s} {e.backend:9s} {mode:16s} {'compiled' if compiled else 'eager':8s} {rate}",
                      flush=True)
            run.write()
    vmamba.set_backend(None)


# ----------------------------------------------------------------------------------------
# 4. Where the time goes: CUDA kernels by the torch profiler

def profile(run, torch, F, vmamba, cfg, device, top=15):
    from torch.profiler import ProfilerActivity
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    name = cfg["zoo"][0]
    torch.manual_seed(0)
    entry = Entry(name, "triton", None)
    entry.model = getattr(vmamba, name)(**cfg["zoo_arch"]).to(device)
    entry.opt = torch.optim.SGD(entry.model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(cfg["batch"], 3, cfg["img"], cfg["img"], device=device)
    target = torch.randint(0, 1000, (cfg["batch"],), device=device)
    steps = 3
    for mode in ("infer_bf16", "train_bf16"):
        entry.model.train(mode == "train_bf16")
        step = make_step(torch, F, vmamba, entry, entry.model, mode, x, target)
        try:
            for _ in range(2):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            with torch.profiler.profile(activities=[activity]) as prof:
                for _ in range(steps):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
        except Exception as exc:
            run.failed(f"profile {name} {mode}", exc)
            continue
        cuda, rows = device.type == "cuda", []
        for e in prof.key_averages():  # on CUDA the kernels (device events), on CPU (--small) the ops
            if cuda and not str(getattr(e, "device_type", "")).endswith("CUDA"):
                continue
            us = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)) if cuda \
                else e.self_cpu_time_total
            rows.append((e.key, us, e.count))
        whole = sum(r[1] for r in rows) or 1.0
        rows = sorted(rows, key=lambda r: -r[1])[:top]
        run.info.setdefault("profile", {})[f"{name} eager {mode}, batch {cfg['batch']}"] = [
            dict(kernel=k, ms=us / 1e3 / steps, share=us / whole, calls=n / steps) for k, us, n in rows]
        run.info.setdefault("profile_total_ms", {})[mode] = whole / 1e3 / steps
    vmamba.set_backend(None)


# ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="output folder")
    parser.add_argument("--small", "--dry-run", action="store_true",
                        help="tiny sizes on CPU with the Triton interpreter (exercises this script)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 450; 60 with --small); a watchdog "
                             "ends it 20 s later")
    parser.add_argument("--skip-bench", action="store_true", help="correctness and compile checks only")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {','.join(SECTIONS)} and profile (default: all but profile)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"throughput modes, of {','.join(MODES)}")
    parser.add_argument("--zoo", default=None, help="zoo models to time (default: vmamba_tiny_s1l8,vmamba_small_s1l20)")
    parser.add_argument("--timm", default=None, help="timm models to time beside them (default: swin_tiny, convnext_tiny)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another vmamba.py whose zoo models are timed side by side with these")
    parser.add_argument("--profile", action="store_true", help="add the profile section")
    args = parser.parse_args(argv)
    cfg = dict(SMALL if args.small else FULL)
    if args.budget is not None:
        cfg["budget"] = args.budget
    sections = [x for x in args.sections.split(",") if x] + (["profile"] if args.profile else [])
    unknown = set(sections) - set(SECTIONS) - {"profile"} or set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown section or mode: {sorted(unknown)}")
    if args.skip_bench:
        sections = [x for x in sections if x != "throughput"]
    cfg["modes"] = args.modes.split(",")
    if args.zoo:
        cfg["zoo"] = tuple(args.zoo.split(","))
    if args.timm is not None:
        cfg["timm"] = {name: cfg["timm"].get(name, {}) for name in args.timm.split(",") if name}
    if args.baseline is not None and not args.baseline.is_file():
        parser.error(f"--baseline: no such file: {args.baseline}")
    # The interpreter replaces the kernels when they are defined, i.e. at import of vmamba.
    if args.small:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)

    import torch
    import torch.nn.functional as F
    if not args.small and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr, flush=True)
        return 2
    sys.path.insert(0, str(ROOT))
    import vmamba
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if args.baseline is not None:
        import importlib.util
        spec = importlib.util.spec_from_file_location("vmamba_baseline", args.baseline)
        cfg["baseline"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cfg["baseline"])
    device = torch.device("cpu" if args.small else "cuda")
    info = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (--small)",
                torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
                backends=vmamba.available_backends(device), small=args.small, budget_s=cfg["budget"])
    run = Run(args.out, cfg["budget"], info)
    try:  # what the step should move, beside what it takes (see tools/bytes_model.py)
        sys.path.insert(0, str(ROOT / "tools"))
        import bytes_model
        info["bytes_model"] = bytes_model.report(cfg["zoo"][0], cfg["batch"], cfg["img"])["totals"]
        run.note("bytes model of {} eager bf16, batch {}: ".format(cfg["zoo"][0], cfg["batch"]) + "; ".join(
            f"{path} path SS2D {t['ss2d_per_element']:.0f} B/element, model {t['model_gb']:.1f} GB/step "
            f"({t['model_ms_at_bandwidth']:.1f} ms at 4 TB/s)" for path, t in info["bytes_model"].items()))
    except Exception as exc:  # a note, not a failed check
        run.note(f"bytes model unavailable: {type(exc).__name__}: {exc}")
    info["section_s"] = {"start-up": round(time.perf_counter() - START, 1)}

    def watchdog():
        with run.lock:
            run.note(f"watchdog: stopped at {time.perf_counter() - START:.0f} s, during {run.section}")
            code = run.finish()
        os._exit(code)

    logging.getLogger("torch._dynamo").addHandler(RecompileLimitNotes(run))
    timer = threading.Timer(max(1.0, run.left() + 20.0), watchdog)
    timer.daemon = True
    timer.start()

    torch.backends.cuda.matmul.allow_tf32 = False  # correctness in true float32
    torch.backends.cudnn.allow_tf32 = False
    if vmamba.available_backends(device).count("triton") == 0:
        run.failed("triton backend available", RuntimeError(f"available: {vmamba.available_backends(device)}"))
    for key, section, fn in (("scan", "selective_scan", check_scans), ("ss2d", "fused SS2D", check_ss2d),
                             ("families", "model families", check_families), ("compile", "torch.compile", check_compile)):
        if key not in sections:
            continue
        run.section = section
        begin = time.perf_counter()
        fn(run, torch, vmamba, cfg, device)
        run.info.setdefault("section_s", {})[section] = round(time.perf_counter() - begin, 1)
        run.write()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "profile" in sections:  # before the throughput section, which uses up what is left of the budget
        run.section = "profile"
        begin = time.perf_counter()
        profile(run, torch, F, vmamba, cfg, device)
        run.info.setdefault("section_s", {})["profile"] = round(time.perf_counter() - begin, 1)
    if "throughput" not in sections:
        run.note("throughput skipped")
    else:
        begin = time.perf_counter()
        bench(run, torch, F, vmamba, cfg, device)
        run.info.setdefault("section_s", {})["throughput"] = round(time.perf_counter() - begin, 1)
    timer.cancel()
    with run.lock:
        return run.finish()


if __name__ == "__main__":
    sys.exit(main())
