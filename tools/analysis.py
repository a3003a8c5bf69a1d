"""What a VMamba model sees and what it costs.

Effective receptive fields, activation maps, the implicit attention of SS2D's four scans,
and latency, throughput and memory against resolution: as functions, and as the commands

    python tools/analysis.py erf --model vmamba_tiny_s1l8,convnext_tiny --out erf.png
    python tools/analysis.py activations --model vmamba_tiny_s1l8 --image photo.jpg --out act.png
    python tools/analysis.py scaling --sizes 384,768,1536 [--out scaling.png]
    python tools/analysis.py highres --sizes 1024,4096,8192 [--out docs/highres.png]
    python tools/analysis.py flops [--model vmamba_tiny_s1l8] [--size 224]

Only torch and vmamba.py are needed to compute; plots need matplotlib, sample photographs
scikit-image, other architectures timm, each imported when asked for. Uses vmamba's
public API only.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

TOOLS = Path(__file__).resolve().parent
for _path in (str(TOOLS.parent), str(TOOLS)):  # vmamba.py, and _common.py beside this file
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

import vmamba  # noqa: E402
from _common import (int_list, optional_import, print_table, resolve_device, warn_once,  # noqa: E402
                     write_csv, write_json)

__all__ = ["stage_features", "effective_receptive_field", "erf_summary", "capture_scan_input",
           "scan_order", "ss2d_attention", "activation_maps", "measure_forward", "loglog_slope", "main"]


# ----------------------------------------------------------------------------------------
# Computation.


def stage_features(model: nn.Module, stage: int = -1) -> Callable[[Tensor], Tensor]:
    """A function from images (B, 3, H, W) to the NCHW output map of one stage of ``model``.

    Works for VMamba and for timm models with ``forward_intermediates`` (stages, or blocks
    for ViTs, counted from 0; negative counts from the end); other models only offer their
    last map, ``forward_features``, as ``stage=-1``.
    """
    if hasattr(model, "forward_intermediates"):
        return lambda x: model.forward_intermediates(x, indices=[stage], intermediates_only=True)[0]
    if stage == -1 and hasattr(model, "forward_features"):
        return model.forward_features
    raise ValueError(f"{type(model).__name__} has no forward_intermediates: only stage=-1 is available")


def effective_receptive_field(features: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """Effective receptive field of the centre of a feature map (Luo et al., NeurIPS 2016).

    ``features`` maps images (1, C_in, H, W) to a map (1, C, h, w), e.g. :func:`stage_features`
    or a plain ``nn.Sequential``. For each of ``images`` (N, C_in, H, W), the channel sum of
    the map at its centre (h // 2, w // 2) is differentiated with respect to the image.
    Returns the absolute gradient summed over input channels and averaged over the images,
    (H, W) float64 on the CPU.
    """
    erf = torch.zeros(images.shape[-2:], dtype=torch.float64)
    for image in images:
        x = image[None].detach().requires_grad_(True)                # (1, C_in, H, W)
        y = features(x)                                               # (1, C, h, w)
        centre = y[0, :, y.shape[2] // 2, y.shape[3] // 2].sum()
        (grad,) = torch.autograd.grad(centre, x)
        erf += grad[0].abs().sum(0).double().cpu()                    # (H, W)
    return erf / len(images)


def erf_summary(erf: Tensor, fractions: Sequence[float] = (0.2, 0.3, 0.5, 0.99)) -> Dict[str, Any]:
    """Numbers that describe an ERF map (H, W).

    ``area_ratio``: for each fraction t, the area of the smallest square centred on the
    centre pixel that holds t of the total ERF, over the image area (RepLKNet's
    "high-contribution area ratio"; 1.0 when even the whole image is needed).
    ``coverage``: the share of pixels above 1e-3 of the maximum. ``corners``: the four corner
    values over the maximum (top-left, top-right, bottom-left, bottom-right).
    """
    h, w = erf.shape
    ci, cj = h // 2, w // 2
    total = float(erf.sum())
    inside = [float(erf[max(ci - r, 0):ci + r + 1, max(cj - r, 0):cj + r + 1].sum())
              for r in range(max(h, w))]                               # mass within radius r
    ratios = {}
    for t in fractions:
        r = next((r for r, m in enumerate(inside) if m >= t * total), max(h, w) - 1)
        area = (min(ci + r + 1, h) - max(ci - r, 0)) * (min(cj + r + 1, w) - max(cj - r, 0))
        ratios[str(t)] = area / (h * w)
    peak = float(erf.max())
    return dict(area_ratio=ratios, coverage=float((erf > 1e-3 * peak).double().mean()),
                corners=[float(erf[i, j]) / peak for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1))])


@contextlib.contextmanager
def capture_scan_input(op: vmamba.SS2D):
    """Within the block, each forward of ``op`` appends its scan input to the yielded list.

    The scan input u (B, H, W, D) is what the four selective scans read: the SiLU of the
    depthwise convolution's output (or of in_proj's first D channels when there is none).
    """
    captured: List[Tensor] = []
    if op.conv2d is not None:
        hook = op.conv2d.register_forward_hook(
            lambda module, args, out: captured.append(F.silu(out).permute(0, 2, 3, 1)))   # (B, H, W, D)
    else:
        hook = op.in_proj.register_forward_hook(
            lambda module, args, out: captured.append(F.silu(out[..., :op.d_inner])))    # (B, H, W, D)
    try:
        yield captured
    finally:
        hook.remove()


def scan_order(h: int, w: int, device: Union[str, torch.device] = "cpu") -> Tensor:
    """(4, H*W) long: the pixel index (i * W + j) at each position of each scan direction,
    as :func:`vmamba.cross_scan` orders them."""
    pixels = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)
    return vmamba.cross_scan(pixels)[0, :, 0].long().to(device)      # (4, L)


def ss2d_attention(op: vmamba.SS2D, u: Tensor, query: Tuple[int, int]) -> Tensor:
    """The implicit attention of SS2D's four scans for one query pixel, exactly.

    With its step sizes dt, input and output projections B and C computed from the input
    (as the layer does), scan k is linear in its input sequence u_k (Ali et al., "The Hidden
    Attention of Mamba Models", 2024): per channel d,

        y_k[t] = sum_{s <= t} M_k[t, s] u_k[s] + D_k u_k[t],
        M_k[t, s] = sum_n C_k[n, t] exp(A_k[n] * (dt_k[s+1] + ... + dt_k[t])) dt_k[s] B_k[n, s],

    and the layer's output before its norm is the sum of the four y_k mapped back to pixels.

    ``u``: the scan input of one image, (H, W, D) (see :func:`capture_scan_input`);
    ``query``: a pixel (i, j) of that map. Returns (4, D, H, W) float64: at [k, d, i', j'],
    M_k[t, s] for channel d, with t the query's position in scan k and s the position of
    pixel (i', j'); zero for pixels the scan reaches after the query. Scans 0 and 1 walk
    the rows and the columns, 2 and 3 the same backwards (as :func:`vmamba.cross_scan`).
    """
    h, w, d = u.shape
    n, r = op.d_state, op.dt_rank
    with torch.no_grad():
        # cross_scan only reorders, so scanning in u's dtype and then widening is exact.
        xs = vmamba.cross_scan(u.permute(2, 0, 1)[None].contiguous())[0].double()   # (4, D, L)
        proj = torch.einsum("kcd,kdl->kcl", op.x_proj_weight.double(), xs)        # (4, R+2N, L)
        dt_low, Bs, Cs = proj.split([r, n, n], dim=1)                             # (4, R|N|N, L)
        dt = F.softplus(torch.einsum("kdr,krl->kdl", op.dt_projs_weight.double(), dt_low)
                        + op.dt_projs_bias.double()[..., None])                   # (4, D, L)
        A = -torch.exp(op.A_logs.double()).view(4, d, n)                          # (4, D, N)
        elapsed = dt.cumsum(-1)                                                   # (4, D, L)
        order = scan_order(h, w, u.device)                                        # (4, L)
        rows = dt.new_zeros(4, d, h * w)                                          # (4, D, L) by pixel
        for k in range(4):
            t = int((order[k] == query[0] * w + query[1]).nonzero())
            gap = elapsed[k, :, t, None] - elapsed[k, :, :t + 1]                  # (D, t+1): dt_{s+1..t}
            decay = torch.exp(gap[:, None, :] * A[k, :, :, None])                 # (D, N, t+1)
            cb = Cs[k, :, t, None] * Bs[k, :, :t + 1]                             # (N, t+1)
            row = dt[k, :, :t + 1] * (decay * cb).sum(1)                          # (D, t+1)
            rows[k].index_copy_(1, order[k, :t + 1], row)
    return rows.view(4, d, h, w)


@torch.no_grad()
def activation_maps(model: vmamba.VSSM, x: Tensor) -> List[Tensor]:
    """Per stage, the L2 norm over channels of its output at each position, (h_i, w_i) float32
    on the CPU, for one image x (1, 3, H, W)."""
    return [f[0].float().norm(dim=0).cpu() for f in model.forward_intermediates(x, intermediates_only=True)]


def _peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Memory a call of ``fn`` needs beyond what was allocated before it, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the memory allocated
    before. CPU (Linux): growth of the process's peak resident set, VmHWM, reset through
    /proc/self/clear_refs after freed heap memory is handed back with glibc's malloc_trim;
    it counts every allocation, torch's and others', page by page. Memory that earlier
    calls left allocated (caches, kept buffers) is not counted again. NaN elsewhere.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20

    def status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    try:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)                          # glibc only
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                              # VmHWM := VmRSS
        before = status_kib("VmRSS")
    except OSError:
        warn_once(f"peak memory on {device.type} needs Linux's /proc/self/clear_refs; reported as NaN")
        fn()
        return float("nan")
    fn()
    return (status_kib("VmHWM") - before) / 1024


@torch.no_grad()
def measure_forward(model: nn.Module, x: Tensor, repeats: int = 5, warmup: int = 1,
                    memory: bool = True) -> Dict[str, float]:
    """Cost of ``model(x)`` without gradients: median latency over ``repeats`` timed calls
    (after ``warmup`` untimed ones), images per second at that latency, and the peak
    memory of one more call beyond weights and input (see :func:`_peak_memory_mib`)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        model(x)
        sync()
        times.append(time.perf_counter() - start)
    latency = statistics.median(times)
    peak = _peak_memory_mib(lambda: model(x), x.device) if memory else float("nan")
    return dict(latency_ms=latency * 1e3, throughput=x.shape[0] / latency, peak_mem_mib=peak)


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y against log x over the finite, positive points; NaN
    with fewer than two. A cost linear in the pixel count has slope 1 against pixels."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0 and math.isfinite(y)]
    if len(pts) < 2:
        return float("nan")
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var if var > 0 else float("nan")


# ----------------------------------------------------------------------------------------
# Command-line side: models by name, images, figures and files.

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation of every released model
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry")
_SCAN_NAMES = ("rows →", "columns ↓", "rows, reversed ←", "columns, reversed ↑")
_ERF_FLOOR = 1e-12  # ERF plots show at most this range below the maximum
_SCALING_MODEL = "vmamba_tiny_s1l8"  # what ``scaling`` measures when given no model


def _analysis_models(names: Optional[str], config: Optional[str], pretrained: Any,
                     default: Optional[str] = None) -> List[Tuple[str, Callable[[], nn.Module]]]:
    """(label, builder) for each comma-separated name: a zoo model, built with the --config
    keywords over its own; else a timm model. No names: ``VSSM(**config)``, else ``default``."""
    kwargs = json.loads(config) if config else {}
    if not isinstance(kwargs, dict):
        raise SystemExit(f"--config must be a JSON object of VSSM keywords, got {config!r}")
    if not names and not config:
        if default is None:
            raise SystemExit("give --model NAME (one of the zoo, or a timm model) or --config JSON")
        names = default
    if not names:
        return [("VSSM", lambda: vmamba.VSSM(**kwargs))]

    def build(name: str) -> nn.Module:
        if name in vmamba.list_models():
            return vmamba.create_model(name, pretrained=pretrained or False, **kwargs)
        timm = optional_import("timm", "timm", f"model {name!r} (not one of {vmamba.list_models()})")
        extra = dict(pretrained_cfg_overlay=dict(file=pretrained)) if isinstance(pretrained, str) else {}
        try:  # ViTs accept other resolutions only with dynamic_img_size
            return timm.create_model(name, pretrained=bool(pretrained), dynamic_img_size=True, **extra)
        except TypeError:
            return timm.create_model(name, pretrained=bool(pretrained), **extra)

    return [(name, lambda name=name: build(name)) for name in names.split(",")]


def _center_crop(image: Tensor, size: int) -> Tensor:
    """(3, H, W) uint8 -> (3, size, size) float in [0, 1]: shorter side resized to ``size``
    (bilinear, antialiased), then the centre cropped."""
    x = image.float()[None] / 255                                     # (1, 3, H, W)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                      mode="bilinear", antialias=True, align_corners=False)
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    return x[0, :, top:top + size, left:left + size].clamp(0, 1)


def _normalize(x: Tensor) -> Tensor:
    """Images in [0, 1], (..., 3, H, W) -> normalised with the ImageNet mean and std."""
    mean = x.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def _read_image(path: str) -> Tensor:
    """An image file as (3, H, W) uint8."""
    Image = optional_import("PIL.Image", "pillow", "reading images")
    with Image.open(path) as im:
        im = im.convert("RGB")
        pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        return pixels.view(im.height, im.width, 3).permute(2, 0, 1)


def _load_images(directory: Optional[str], count: int, size: int) -> Tuple[Tensor, str]:
    """Up to ``count`` images as (N, 3, size, size) in [0, 1], and where they came from: the
    files of ``directory``; else scikit-image's sample photographs; else uniform noise."""
    if directory:
        paths = sorted(os.path.join(directory, f) for f in os.listdir(directory)
                       if f.lower().endswith(_IMAGE_SUFFIXES))[:count]
        if not paths:
            raise SystemExit(f"no images ({', '.join(_IMAGE_SUFFIXES)}) in {directory}")
        return torch.stack([_center_crop(_read_image(p), size) for p in paths]), directory
    try:
        data = optional_import("skimage.data", "scikit-image", "sample photographs")
    except ImportError as e:
        warn_once(f"no images given and {e}; using random inputs instead")
        return torch.rand(count, 3, size, size), "random inputs"
    names = _SAMPLE_PHOTOS[:count]
    photos = [torch.from_numpy(getattr(data, name)().copy()).permute(2, 0, 1) for name in names]
    return torch.stack([_center_crop(p, size) for p in photos]), "scikit-image: " + ", ".join(names)


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure of ``width`` x ``height`` inches; no pyplot, so no GUI backend."""
    figure = optional_import("matplotlib.figure", "matplotlib", "plotting")
    return figure.Figure(figsize=(width, height), layout="constrained")


def _sibling(path: str, suffix: str) -> str:
    """``path`` with its extension replaced by ``suffix``: where the numbers go."""
    return os.path.splitext(path)[0] + suffix


def _hide_axes(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def flops_table(shape: Sequence[int] = (3, 224, 224), names: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Params (M) and GFLOPs (``VSSM.flops``: multiply-adds) of zoo models beside the published GFLOPs, built on the
    meta device (no weights, no downloads); ``error``: the relative difference, at 224 px."""
    rows = []
    for name in names or vmamba.list_models():
        with torch.device("meta"):
            model = vmamba.create_model(name)
        gflops, published = model.flops(shape) / 1e9, vmamba._ZOO[name][3]
        rows.append(dict(model=name, params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                         gflops=round(gflops, 2), published_gflops=published,
                         error=f"{gflops / published - 1:+.1%}" if tuple(shape) == (3, 224, 224) else "-"))
    return rows


def _cmd_flops(args: argparse.Namespace) -> int:
    rows = flops_table((3, args.size, args.size), args.model.split(",") if args.model else None)
    print(f"params and GFLOPs (multiply-adds) at {args.size}x{args.size}; scans count 9*L*D*N")
    print_table(rows, ["model", "params_m", "gflops", "published_gflops", "error"])
    return 0


def _cmd_erf(args: argparse.Namespace) -> int:
    """``erf``: ERF of the centre of a stage, side by side for several models."""
    optional_import("matplotlib", "matplotlib", "plotting")          # fail before the work
    device = resolve_device(args.device)
    images, source = _load_images(args.images, args.num_images, args.size)
    x = _normalize(images).to(device)                                 # (N, 3, S, S)
    print(f"erf: {len(x)} image(s) from {source}, {args.size} px, stage {args.stage}, device {device}")
    results = []
    for label, build in _analysis_models(args.model, args.config, args.pretrained):
        torch.manual_seed(0)
        model = build().to(device).eval()
        start = time.perf_counter()
        erf = effective_receptive_field(stage_features(model, args.stage), x)
        summary = erf_summary(erf)
        print(f"  {label}: {time.perf_counter() - start:.1f} s, area ratio (t=0.2, 0.5, 0.99) "
              + ", ".join(f"{summary['area_ratio'][t]:.3f}" for t in ("0.2", "0.5", "0.99"))
              + f", coverage {summary['coverage']:.3f}")
        results.append((label, erf, summary))

    # One colour scale for all panels: from the smallest non-zero value of any map to the peak.
    normed = [erf / erf.max().clamp(min=1e-300) for _, erf, _ in results]          # (S, S) in [0, 1]
    floor = min([float(e[e > 0].min()) for e in normed if (e > 0).any()] + [1e-2])
    floor = max(floor, _ERF_FLOOR)
    figure = _new_figure(3.0 * len(results) + 1.0, 3.2)
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    for ax, heat, (label, erf, summary) in zip(axes, normed, results):
        im = ax.imshow(torch.log10(heat.clamp(min=floor)).numpy(), cmap="RdYlGn", vmin=math.log10(floor), vmax=0)
        ax.set_title(f"{label}\nhigh-contribution area (t=0.2): {summary['area_ratio']['0.2']:.1%}",
                     fontsize=8)
        _hide_axes(ax)
    figure.colorbar(im, ax=list(axes), shrink=0.8, label="log10(ERF / max)")
    pretrained = "pretrained" if args.pretrained else "random weights"
    figure.suptitle(f"Effective receptive field, centre of stage {args.stage} ({pretrained}; "
                    f"{len(x)} image(s), {args.size} px)", fontsize=9)
    figure.savefig(args.out, dpi=args.dpi)

    np = optional_import("numpy", "numpy", "writing arrays")
    np.savez_compressed(_sibling(args.out, ".npz"), **{label: erf.numpy() for label, erf, _ in results})
    write_json(_sibling(args.out, ".json"), dict(
        source=source, size=args.size, stage=args.stage, num_images=len(x), pretrained=bool(args.pretrained),
        models={label: summary for label, _, summary in results}))
    print(f"wrote {args.out}, {_sibling(args.out, '.npz')} (ERF maps), {_sibling(args.out, '.json')}")
    return 0


def _overlay(ax: Any, image: Tensor, heat: Tensor, title: str, decades: Optional[int] = None) -> None:
    """``image`` (3, H, W) in [0, 1] with ``heat`` (h, w) >= 0 stretched over it: from its
    minimum to its maximum, or on a log scale over ``decades`` below the maximum."""
    h, w = image.shape[1:]
    heat = heat.double()
    if decades:
        heat = torch.log10((heat / heat.max().clamp(min=1e-300)).clamp(min=10.0 ** -decades))
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-300)   # (h, w) in [0, 1]
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.imshow(heat.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1, extent=(0, w, h, 0), interpolation="bilinear")
    ax.set_title(title, fontsize=8)
    _hide_axes(ax)


def _cmd_activations(args: argparse.Namespace) -> int:
    """``activations``: per-stage activation maps and one SS2D layer's implicit attention."""
    optional_import("matplotlib", "matplotlib", "plotting")          # fail before the work
    device = resolve_device(args.device)
    if args.model and "," in args.model:
        raise SystemExit("activations takes one model")
    (label, build), = _analysis_models(args.model, args.config, args.pretrained)
    torch.manual_seed(0)
    model = build().to(device).eval()
    if not isinstance(model, vmamba.VSSM):
        raise SystemExit(f"activations needs a VMamba model, got {type(model).__name__}")
    if args.image:
        image, source = _center_crop(_read_image(args.image), args.size), args.image
    else:
        images, source = _load_images(None, 1, args.size)
        image = images[0]                                             # (3, S, S) in [0, 1]
    n_stages = len(model.layers)
    if not -n_stages <= args.stage < n_stages:
        raise SystemExit(f"--stage must be in [{-n_stages}, {n_stages}), got {args.stage}")
    blocks = model.layers[args.stage].blocks
    if not -len(blocks) <= args.block < len(blocks):
        raise SystemExit(f"--block must be in [{-len(blocks)}, {len(blocks)}) for stage {args.stage}, "
                         f"got {args.block}")
    op = blocks[args.block].op

    x = _normalize(image)[None].to(device)                            # (1, 3, S, S)
    with capture_scan_input(op) as captured:
        maps = activation_maps(model, x)
    u = captured[0][0]                                                # (h, w, D)
    h, w = u.shape[:2]
    query = (min(int(args.query[0] * h), h - 1), min(int(args.query[1] * w), w - 1))
    rows = ss2d_attention(op, u, query).cpu()                         # (4, D, h, w)
    per_scan = rows.abs().mean(1)                                     # (4, h, w)
    combined = rows.sum(0).abs().mean(0)                              # (h, w)

    cols = max(n_stages, 4) + 1
    figure = _new_figure(2.2 * cols, 4.9)
    axes = figure.subplots(2, cols, squeeze=False)
    axes[0, 0].imshow(image.permute(1, 2, 0).numpy())
    axes[0, 0].set_title("input", fontsize=8)
    for ax in axes.flat:
        _hide_axes(ax)
    for i, heat in enumerate(maps):
        _overlay(axes[0, i + 1], image, heat, f"stage {i}: |feature|, {heat.shape[0]}x{heat.shape[1]}")
    stage = args.stage % n_stages
    block = args.block % len(blocks)
    qy, qx = ((query[0] + 0.5) * args.size / h, (query[1] + 0.5) * args.size / w)
    _overlay(axes[1, 0], image, combined, f"stage {stage} block {block}: attention,\nall scans", decades=3)
    for k in range(4):
        _overlay(axes[1, k + 1], image, per_scan[k], f"scan {k}: {_SCAN_NAMES[k]}", decades=3)
    for ax in axes[1, :5]:
        ax.plot([qx], [qy], marker="+", color="white", markersize=10, markeredgewidth=2)
    pretrained = "pretrained" if args.pretrained else "random weights"
    figure.suptitle(f"{label} ({pretrained}): activation maps (top) and the implicit attention of "
                    f"one SS2D layer for the query + (bottom;\nmean |M| over channels, log scale over 3 decades)", fontsize=9)
    figure.savefig(args.out, dpi=args.dpi)

    write_json(_sibling(args.out, ".json"), dict(
        model=label, image=source, size=args.size, pretrained=bool(args.pretrained),
        activation_maps=[m.tolist() for m in maps],
        attention=dict(stage=stage, block=block, query=list(query), map_size=[h, w],
                       scans=per_scan.tolist(), all_scans=combined.tolist())))
    print(f"wrote {args.out} and {_sibling(args.out, '.json')}")
    return 0


_SCALING_METRICS = (("latency_ms", "latency (ms)"), ("throughput", "throughput (images/s)"),
                    ("peak_mem_mib", "peak memory of a forward (MiB)"))


def _cmd_scaling(args: argparse.Namespace) -> int:
    """``scaling``: latency, throughput and peak memory against resolution; the plot and
    its .csv only with ``--out``."""
    if args.out:
        optional_import("matplotlib", "matplotlib", "plotting")      # fail before the work
    device = resolve_device(args.device)
    rows = []
    print(f"scaling: device {device}, batch {args.batch}, median of {args.repeats} after {args.warmup} "
          f"warm-up, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for label, build in _analysis_models(args.model, args.config, None, default=_SCALING_MODEL):
        torch.manual_seed(0)
        model = build().to(device).eval()
        for size in args.sizes:
            row = dict(model=label, size=size, pixels=size * size, batch=args.batch, device=str(device))
            try:
                x = torch.randn(args.batch, 3, size, size, device=device)
                row.update(measure_forward(model, x, args.repeats, args.warmup, memory=not args.no_memory))
            except (RuntimeError, MemoryError) as e:  # out of memory at this size: record, go on
                warn_once(f"{label} at {size} px failed: {type(e).__name__}: {str(e)[:200]}")
                row.update(latency_ms=float("nan"), throughput=float("nan"), peak_mem_mib=float("nan"))
            rows.append(row)
            print(f"  {label:24s} {size:5d} px  {row['latency_ms']:10.1f} ms  {row['throughput']:9.2f} img/s"
                  f"  {row['peak_mem_mib']:9.1f} MiB")
        del model

    labels = list(dict.fromkeys(r["model"] for r in rows))
    slopes = {label: {key: loglog_slope([r["pixels"] for r in rows if r["model"] == label],
                                        [r[key] for r in rows if r["model"] == label])
                      for key, _ in _SCALING_METRICS} for label in labels}
    print("fitted exponents against pixels (cost ∝ pixels^e):")
    print_table([dict(model=label, **{key: f"{e:.2f}" for key, e in slopes[label].items()}) for label in labels],
                ["model"] + [key for key, _ in _SCALING_METRICS])
    if not args.out:
        return 0

    write_csv(_sibling(args.out, ".csv"), rows,
              ["model", "size", "pixels", "batch", "device", "latency_ms", "throughput", "peak_mem_mib"])
    figure = _new_figure(13.5, 4.2)
    axes = figure.subplots(1, 3)
    for ax, (key, title) in zip(axes, _SCALING_METRICS):
        for label in labels:
            pts = [(r["pixels"], r[key]) for r in rows if r["model"] == label and r[key] > 0]   # drops NaN
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label=f"{label}  (∝ pixels^{slopes[label][key]:.2f})")
        ax.set_xscale("log")
        if ax.has_data():
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
        ax.set_xticks([s * s for s in args.sizes], [f"{s}²" for s in args.sizes])
        ax.minorticks_off()
        ax.set_xlabel("input pixels")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    memory = "CUDA max_memory_allocated" if device.type == "cuda" else "growth of peak resident set"
    figure.suptitle(f"Cost against resolution: batch {args.batch}, {device}, float32, no_grad; "
                    f"median of {args.repeats}; memory: {memory}", fontsize=9)
    figure.savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out} and {_sibling(args.out, '.csv')}")
    return 0


_HIGHRES_MODELS = "vmamba_tiny_s1l8,convnext_tiny"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _cmd_highres_one(args: argparse.Namespace) -> int:
    """One forward pass of one model at one size in inference mode, in this (fresh) process: prints
    a JSON line with its time, and the process's resident set before it and its peak (Linux)."""
    torch.set_num_threads(args.threads)
    (_, build), = _analysis_models(args.model, args.config, None)
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(1, 3, args.size, args.size)
    with torch.inference_mode():
        before, times = _status_kib("VmRSS"), []
        for _ in range(args.repeats + (args.repeats > 1)):           # repeated: one more call first, untimed
            start = time.perf_counter()
            out = model(x)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times[args.repeats > 1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss       # KiB on Linux
    print(json.dumps(dict(seconds=seconds, rss_before_kib=before, peak_rss_kib=peak,
                          finite=bool(torch.isfinite(out).all()))))
    return 0


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    memory = ""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/meminfo") as f:
            memory = f", {int(next(line.split()[1] for line in f if line.startswith('MemTotal'))) / 2 ** 20:.0f} GiB"
    return f"{cpu}, {os.cpu_count()} logical CPUs{memory}, {platform.system()} {platform.release()}"


def _cmd_highres(args: argparse.Namespace) -> int:
    """``highres``: each model at each size in a fresh process (one forward pass in inference
    mode): time, time per pixel, peak resident set against the first stage's map; the plot of
    time per pixel against size (flat: linear cost), and with ``--out`` a .csv and a .md."""
    if args.out:
        optional_import("matplotlib", "matplotlib", "plotting")      # fail before the work
    names = args.model.split(",") if args.model else ["VSSM"] if args.config else _HIGHRES_MODELS.split(",")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        timm_version = importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        timm_version = "not installed"
    setup = (f"torch {torch.__version__}, timm {timm_version}, "
             f"{args.threads} threads, batch 1, inference mode, each model and size in a fresh process, "
             + ("one call" if args.repeats == 1 else f"median of {args.repeats} calls after one"))
    print(f"highres: {_machine()}; {setup}")
    rows = []
    for size in args.sizes:
        for name in names:
            command = [sys.executable, os.path.abspath(__file__), "highres-one", "--size", str(size), "--threads",
                       str(args.threads), "--repeats", str(args.repeats)] + (["--config", args.config] if args.config
                                                                             else []) + (["--model", name] * (name != "VSSM"))
            run = subprocess.run(command, capture_output=True, text=True,
                                 env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
            row = dict(model=name, size=size, pixels=size * size)
            if run.returncode == 0:
                row.update(json.loads(run.stdout.strip().splitlines()[-1]))
            else:
                warn_once(f"{name} at {size} px failed (exit {run.returncode}): {run.stderr.strip()[-300:]}")
                row.update(seconds=float("nan"), rss_before_kib=float("nan"), peak_rss_kib=float("nan"), finite=False)
            stage1 = (size // 4) ** 2 * 96 * 4                       # bytes of a first stage's map (96 ch, stride 4)
            row.update(ns_per_pixel=row["seconds"] / row["pixels"] * 1e9, peak_rss_gib=row["peak_rss_kib"] / 2 ** 20,
                       forward_peak_per_stage1_map=(row["peak_rss_kib"] - row["rss_before_kib"]) * 1024 / stage1)
            rows.append(row)
            print(f"  {name:20s} {size:6d} px  {row['seconds']:9.2f} s  {row['ns_per_pixel']:8.0f} ns/px  peak "
                  f"{row['peak_rss_gib']:6.2f} GiB  forward {row['forward_peak_per_stage1_map']:5.2f}x stage-1 map",
                  flush=True)
    if len(names) > 1:
        print(f"time ratios {names[0]} / {names[1]}:")
        for size in args.sizes:
            a, b = (next(r["seconds"] for r in rows if r["model"] == n and r["size"] == size) for n in names[:2])
            print(f"  {size:6d} px  {a / b:.2f}")
    if not args.out:
        return 0
    columns = ["model", "size", "pixels", "seconds", "ns_per_pixel", "rss_before_kib", "peak_rss_kib",
               "peak_rss_gib", "forward_peak_per_stage1_map", "finite"]
    write_csv(_sibling(args.out, ".csv"), rows, columns)
    figure = _new_figure(10, 4.2)
    for ax, (key, title) in zip(figure.subplots(1, 2), (("ns_per_pixel", "time per pixel (ns)"),
                                                        ("forward_peak_per_stage1_map",
                                                         "forward's peak resident set / first stage's map"))):
        for name in names:
            pts = [(r["pixels"], r[key]) for r in rows if r["model"] == name and math.isfinite(r[key])]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xticks([s * s for s in args.sizes], [f"{s}²" for s in args.sizes])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel("input pixels")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    command = "python tools/analysis.py " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("analysis.py") else ""
    figure.suptitle(f"{_machine()}\n{setup}; {started}", fontsize=8)
    figure.savefig(args.out, dpi=args.dpi)
    lines = [f"# Cost against image size, {', '.join(names)}", "",
             f"Written by `{command or 'tools/analysis.py highres'}` on {started}.",
             f"Machine: {_machine()}. {setup}; random weights and inputs. Peak: the "
             "process's peak resident set; 'forward' counts what the forward pass added to it, in units of a first "
             "stage's map (size/4 squared x 96 channels x 4 bytes).", "",
             "| model | size | seconds | ns / pixel | peak RSS (GiB) | forward peak / stage-1 map |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['size']} | {r['seconds']:.2f} | {r['ns_per_pixel']:.0f} | {r['peak_rss_gib']:.2f} "
              f"| {r['forward_peak_per_stage1_map']:.2f} |" for r in rows]
    with open(_sibling(args.out, ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}, {_sibling(args.out, '.csv')} and {_sibling(args.out, '.md')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: subcommands ``erf``, ``activations``, ``scaling``, ``highres`` and ``flops``."""
    parser = argparse.ArgumentParser(
        prog="tools/analysis.py", description="What a VMamba model sees and what it costs: effective "
        "receptive fields, activation maps with SS2D's implicit attention, and cost against resolution.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(p: argparse.ArgumentParser, model_help: str, pretrained: bool = True,
               out_required: bool = True) -> None:
        p.add_argument("--model", "--models", dest="model", default=None, help=model_help)
        p.add_argument("--config", default=None, metavar="JSON",
                       help="VSSM keywords as a JSON object: with --model they override the zoo "
                            "model's, alone they build VSSM(**config), e.g. "
                            "'{\"depths\": [1, 1, 1, 1], \"dims\": 16}' for a small random model")
        if pretrained:
            p.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="PATH_OR_URL",
                           help="load the released weights (needs network), or the given file/URL "
                                "(default: random weights)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
        p.add_argument("--out", required=out_required, default=None,
                       help="PNG file to write; the numbers go next to it"
                            + ("" if out_required else " (default: only print the table)"))
        p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default: 100)")

    models = "comma-separated zoo names, or timm models when timm is installed"
    p = commands.add_parser(
        "erf", help="effective receptive field of a stage's centre, for one or more models",
        description="Gradient of the centre of a stage's output map (summed over channels) with "
        "respect to the input, |.| summed over colours, averaged over images, plotted as "
        "log10(ERF / max). Writes the PNG, the maps (.npz) and summary numbers (.json).")
    common(p, models)
    p.add_argument("--images", default=None, metavar="DIR",
                   help="folder of images (default: scikit-image's sample photographs, else noise)")
    p.add_argument("--num-images", type=int, default=4, help="images to average over (default: 4)")
    p.add_argument("--size", type=int, default=224, help="input resolution (default: 224)")
    p.add_argument("--stage", type=int, default=-1, help="stage whose output is used (default: -1, the last)")
    p.set_defaults(run=_cmd_erf)

    p = commands.add_parser(
        "activations", help="per-stage activation maps and the implicit attention of one SS2D layer",
        description="Top row: the L2 norm over channels of each stage's output. Bottom row: for one "
        "SS2D layer and a query position, the row of each scan's implicit attention matrix "
        "M_k[t, s] (mean |M| over channels), mapped back to pixels. Writes the PNG and a .json.")
    common(p, "a zoo name")
    p.add_argument("--image", default=None, metavar="PATH",
                   help="image file (default: scikit-image's astronaut, else noise)")
    p.add_argument("--size", type=int, default=224, help="input resolution (default: 224)")
    p.add_argument("--stage", type=int, default=0, help="stage of the SS2D layer (default: 0)")
    p.add_argument("--block", type=int, default=-1, help="block within that stage (default: -1, the last)")
    p.add_argument("--query", type=float, nargs=2, default=(0.5, 0.5), metavar=("Y", "X"),
                   help="query position as fractions of the height and width (default: 0.5 0.5)")
    p.set_defaults(run=_cmd_activations)

    p = commands.add_parser(
        "scaling", help="latency, throughput and peak memory against resolution",
        description="Forward passes without gradients on random inputs (random weights: cost does "
        "not depend on them); prints the table and the fitted exponents against the pixel count. "
        "With --out, also log-log plots, and the table as a .csv next to the PNG. Peak memory: "
        "on CUDA max_memory_allocated beyond what was allocated before; on CPU the growth of "
        "the process's peak resident set (Linux) during one forward pass.")
    common(p, models + f" (default: {_SCALING_MODEL})", pretrained=False, out_required=False)
    p.add_argument("--sizes", type=int_list, default=[224, 384, 512, 768, 1024],
                   help="comma-separated resolutions (default: 224,384,512,768,1024)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed forward passes per point (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forward passes first (default: 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.set_defaults(run=_cmd_scaling)

    p = commands.add_parser(
        "highres", help="time and peak memory of one forward pass at large sizes, beside other models",
        description="Each model at each size in a fresh process: one forward pass in inference mode "
        "(batch 1, random weights and input), its time, time per pixel, and the process's peak "
        "resident set, also as a multiple of the first stage's map (size/4 squared x 96 floats). "
        "With --out: a plot of time per pixel and memory against size, a .csv and a .md beside it.")
    common(p, models + f" (default: {_HIGHRES_MODELS})", pretrained=False, out_required=False)
    p.add_argument("--sizes", type=int_list, default=[1024, 2048, 4096], help="comma-separated sizes "
                   "(default: 1024,2048,4096)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="intra-op threads of each run (default: this process's)")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed calls per run, median, after an untimed one when more than 1 (default: 1)")
    p.set_defaults(run=_cmd_highres)

    p = commands.add_parser("flops", help="params and GFLOPs of the zoo beside the published table",
                            description="Params and GFLOPs (multiply-adds; 9*L*D*N per selective scan) "
                            "of zoo models, counted without weights or downloads.")
    p.add_argument("--model", default=None, help="comma-separated zoo names (default: all)")
    p.add_argument("--size", type=int, default=224, help="input resolution (default: 224)")
    p.set_defaults(run=_cmd_flops)

    p = commands.add_parser("highres-one", help=argparse.SUPPRESS)   # one run of highres, in its own process
    p.add_argument("--model", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(run=_cmd_highres_one)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; ``argv`` defaults to the process's arguments. Returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
