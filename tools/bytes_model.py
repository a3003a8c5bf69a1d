#!/usr/bin/env python
"""HBM bytes per step of VMamba's eager inference under bfloat16 autocast on a CUDA GPU, kernel by kernel, for
SS2D's fused Triton path (this vmamba.py) and the path before it (cross-scan copies, the chunked scan kernel
writing float32, a cross-merge kernel, torch ops for the D term and out_norm); and, for training, the SS2D layers'
backward in both paths (autograd's kernels; the fused scan's own backward kernel in the new one).

    python tools/bytes_model.py [--model vmamba_tiny_s1l8] [--batch 128] [--img 224] [--json PATH] [--markdown PATH]

The launch shapes come from the model itself: it is built on the meta device and run once at the given batch and
size, with hooks recording the input of every SS2D layer, block, downsampling layer and the stem; the fused scan's
variant (dt made inside, or by a GEMM for large ranks) is the one vmamba's dispatcher picks. Each kernel is counted
as reading its inputs and writing its outputs once, in the dtypes autocast gives them on CUDA: matmuls and
convolutions in bfloat16 (a float32 input costs a cast kernel first), LayerNorm in float32 (a bfloat16 input is
cast up), the residual stream in float32. On the new path the blocks' norms are the add + LayerNorm kernels, which
read the float32 stream (and the bfloat16 branch output) and write n in bfloat16 (and the sum in float32); the stem's
and downsampling's norms are the same kernel without the add, reading the convolution's bfloat16 output and writing
float32 (bfloat16 for the stem's first, which its GELU and second convolution read). Weights, the scan's chunk
states and reductions are left out (under 1%).
"Per element" divides by the SS2D map elements of a step (batch x pixels x inner channels, summed over blocks).
A model, not a measurement: caches, GEMM re-reads and launch overheads are not in it.
"""
import argparse
import datetime
import json
import platform
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vmamba  # noqa: E402

F32, BF16 = 4, 2
BANDWIDTH = 4.0e12   # bytes/s an H200 sustains on streaming kernels (~0.05 ms per byte/element at VMamba-T b128)


class Tally:
    """Bytes read and written per kernel name, and launches, for one path."""

    def __init__(self):
        self.bytes, self.calls, self.ss2d = defaultdict(float), defaultdict(int), set()

    def add(self, name, read, write, ss2d=False):
        self.bytes[name] += read + write
        self.calls[name] += 1
        if ss2d:
            self.ss2d.add(name)

    def total(self, ss2d_only=False):
        return sum(v for k, v in self.bytes.items() if k in self.ss2d or not ss2d_only)


def layer_norm(t, name, rows, c, in_bytes, ss2d=False):
    """LayerNorm under CUDA autocast: float32 compute and output; a bfloat16 input is cast up first."""
    if in_bytes != F32:
        t.add(f"cast to float32 ({name})", rows * c * in_bytes, rows * c * F32, ss2d)
    t.add(f"LayerNorm ({name})", rows * c * F32, rows * c * F32, ss2d)


def matmul(t, name, rows, c_in, c_out, in_bytes, ss2d=False):
    """nn.Linear / 1x1 GEMM in bfloat16; a float32 input is cast down first."""
    if in_bytes != BF16:
        t.add(f"cast to bfloat16 ({name})", rows * c_in * in_bytes, rows * c_in * BF16, ss2d)
    t.add(f"GEMM ({name})", rows * c_in * BF16, rows * c_out * BF16, ss2d)


def ss2d_front(t, m, layer, in_bytes=F32):
    """in_proj, depthwise conv, SiLU and x_proj: the same in both paths, but for in_proj's input, which torch's
    LayerNorm hands over in float32 and the fused block norms in bfloat16. Returns (D, N, R, P)."""
    c, d, n, r = layer.in_proj.in_features, layer.d_inner, layer.d_state, layer.dt_rank
    matmul(t, "in_proj", m, c, layer.in_proj.out_features, in_bytes, True)
    t.add("depthwise conv2d", m * d * BF16, m * d * BF16, True)
    t.add("SiLU", m * d * BF16, m * d * BF16, True)
    t.add("GEMM (x_proj)", m * d * BF16, m * 4 * (r + 2 * n) * BF16, True)
    return d, n, r, r + 2 * n


def ss2d_old(t, m, layer):
    """The path before the fusion (commit 10c46f9), kernel by kernel."""
    d, n, r, p = ss2d_front(t, m, layer)
    t.add("copy: x_proj output to sequences", m * 4 * p * BF16, m * 4 * p * BF16, True)
    t.add("copy: dts for the dt GEMM", m * 4 * r * BF16, m * 4 * r * BF16, True)
    t.add("GEMM (dt_projs)", m * 4 * r * BF16, m * 4 * d * BF16, True)
    t.add("cross-scan kernel", m * d * BF16, 4 * m * d * BF16, True)
    t.add("copy: B, C contiguous", 2 * m * 4 * n * BF16, 2 * m * 4 * n * BF16, True)
    t.add("selective-scan kernel", 2 * 4 * m * d * BF16 + 2 * 4 * m * n * BF16, 4 * m * d * F32, True)
    t.add("cross-merge kernel", 4 * m * d * F32, m * d * F32, True)
    t.add("addcmul (D term)", m * d * (F32 + BF16), m * d * F32, True)
    t.add("cast to bfloat16 (core output)", m * d * F32, m * d * BF16, True)
    layer_norm(t, "out_norm", m, d, BF16, True)
    if layer.gated:
        t.add("SiLU (gate)", m * d * BF16, m * d * BF16, True)
        t.add("mul (gate)", m * d * (F32 + BF16), m * d * F32, True)
    matmul(t, "out_proj", m, d, layer.out_proj.out_features, F32, True)


def ss2d_new(t, m, layer, fused_norms):
    """The fused path: the scan reads the map in place and adds D*x to each direction; one kernel merges, normalises
    and gates."""
    d, n, r, p = ss2d_front(t, m, layer, BF16 if fused_norms else F32)
    if vmamba._ss2d_blocks(d, n, r)[2]:   # dt made inside the scan
        t.add("fused SS2D scan kernel", 4 * m * d * BF16 + m * 4 * p * BF16, 4 * m * d * BF16, True)
    else:                                 # dt (B, H, W, 4, D) from a GEMM, read by the scan
        t.add("GEMM (dt_projs, channels-last)", m * 4 * r * BF16, m * 4 * d * BF16, True)
        t.add("fused SS2D scan kernel", 4 * m * d * BF16 * 2 + m * 4 * p * BF16, 4 * m * d * BF16, True)
    t.add("merge + out_norm (+ gate) kernel", 4 * m * d * BF16 + m * d * BF16 * (1 if layer.gated else 0),
          m * d * BF16, True)
    matmul(t, "out_proj", m, d, layer.out_proj.out_features, BF16, True)


def fuses_norms(block):
    """Whether a block on the Triton path runs its norms in the add + LayerNorm kernels (VSSBlock.forward's test)."""
    return block.mlp is not None and not block.post_norm


def ss2d_front_backward(t, m, layer, out_proj_in, in_proj_in=F32, extra_add=True):
    """The gradients through out_proj, x_proj, SiLU, the depthwise conv and in_proj: the same kernels in both paths
    but for the casts (``out_proj_in``, ``in_proj_in``: the dtypes out_proj and in_proj read) and the adds of x's
    gradients: the scan's (or merge's), x_proj's and, with ``extra_add``, the D term's. Each GEMM's backward is two
    GEMMs (dgrad, wgrad)."""
    c, d, n, r = layer.in_proj.in_features, layer.d_inner, layer.d_state, layer.dt_rank
    c_out, zx, p = layer.out_proj.out_features, layer.in_proj.out_features, r + 2 * n
    t.add("GEMM backward (out_proj)", m * c_out * BF16 * 2 + m * d * BF16, m * d * BF16, True)
    if out_proj_in != BF16:
        t.add("cast backward (out_proj)", m * d * BF16, m * d * out_proj_in, True)
    t.add("GEMM backward (x_proj)", m * 4 * p * BF16 * 2 + m * d * BF16, m * d * BF16, True)
    t.add("add (gradients of x)", 2 * m * d * BF16 * (1 + extra_add), m * d * BF16 * (1 + extra_add), True)
    t.add("SiLU backward", 2 * m * d * BF16, m * d * BF16, True)
    t.add("depthwise conv2d backward", 3 * m * d * BF16, m * d * BF16, True)
    t.add("GEMM backward (in_proj)", m * zx * BF16 * 2 + m * c * BF16, m * c * BF16, True)
    if in_proj_in != BF16:
        t.add("cast backward (in_proj)", m * c * BF16, m * c * in_proj_in, True)


def ss2d_old_backward(t, m, layer):
    """Autograd through the path before the fusion: torch ops, the cross-scan and cross-merge kernels' adjoints and
    the chunked selective-scan backward kernel (float32 du and ddelta, from the chunk states the forward kept)."""
    d, n, r = layer.d_inner, layer.d_state, layer.dt_rank
    if layer.gated:
        t.add("mul backward (gate)", 2 * m * d * F32 + m * d * BF16, m * d * F32 + m * d * BF16, True)
        t.add("SiLU backward (gate)", 2 * m * d * BF16, m * d * BF16, True)
    t.add("LayerNorm backward (out_norm)", 2 * m * d * F32, m * d * F32, True)
    t.add("cast backward (out_norm, core output)", m * d * (F32 + BF16), m * d * (BF16 + F32), True)
    t.add("mul backward (D term)", m * d * (F32 + BF16) + m * d * F32, m * d * BF16, True)
    t.add("cross-merge backward (cross-scan of the gradient)", m * d * F32, 4 * m * d * F32, True)
    t.add("selective-scan backward kernel", 2 * 4 * m * d * BF16 + 4 * m * d * F32 + 2 * m * 4 * n * BF16,
          2 * 4 * m * d * F32 + 2 * m * 4 * n * F32, True)
    t.add("cross-scan backward (cross-merge of du)", 4 * m * d * F32, m * d * F32, True)
    t.add("cast backward (du, ddelta)", m * d * F32 + 4 * m * d * F32, m * d * BF16 + 4 * m * d * BF16, True)
    t.add("GEMM backward (dt_projs)", 4 * m * d * BF16 * 2 + m * 4 * r * BF16, m * 4 * r * BF16, True)
    t.add("copies backward (sequences to pixels)", 2 * m * 4 * (r + 2 * n) * BF16, 2 * m * 4 * (r + 2 * n) * BF16, True)
    ss2d_front_backward(t, m, layer, F32)


def ss2d_new_backward(t, m, layer, fused_norms):
    """The fused path's backward. In training the merge kernel keeps its merged map m (float32), whose LayerNorm
    backward is the add + LayerNorm backward kernel (a gate's gradients are torch ops, float32); then the fused scan
    backward kernel, which also takes the D term's gradients. The scan's forward keeps every 32nd state of each
    direction in training (written there, read here once). From them the backward kernel sweeps each direction
    twice, per segment of 32 steps: the recomputation and the backward step; the second reads what the first read 32
    steps earlier, and the segment's states (32 x N x 64 floats a program) are re-read at once, so both count as L2
    traffic, not HBM. It writes dx per direction in bfloat16 and partial sums over 64-channel blocks of ddts, dB and
    dC in float32."""
    d, n, r = layer.d_inner, layer.d_state, layer.dt_rank
    f, h = m * d * F32, m * d * BF16
    t.add("merge kernel: the merged map kept for the backward", 0, f, True)
    if layer.gated:   # y = norm(m) again, z cast up, sigmoid, g * z * s, and dz's five elementwise ops and cast
        for name, read, write in [("LayerNorm of m", f, f), ("cast of z", h, f), ("sigmoid", f, f),
                                  ("g * z * s", h + 2 * f, 2 * f), ("dz", 9 * f, 5 * f), ("cast of dz", f, h)]:
            t.add(f"gate backward (torch ops: {name})", read, write, True)
    t.add("merge + out_norm backward (add + LayerNorm backward kernel)", f + (f if layer.gated else h), h, True)
    block_d, _, block_r = vmamba._ss2d_blocks(d, n, r, backward=True)
    low, parts = block_r > 0, 4 * m * (d // block_d) * (2 * n + (r if block_r else 0)) * F32   # partial sums
    states = 4 * m * d * n * F32 / vmamba._SS2D_SEGMENT   # every 32nd state of each direction
    if not low:   # dt (B, H, W, 4, D) again, read by the kernel; ddt written, then its two GEMMs
        t.add("GEMM (dt_projs, channels-last, again)", m * 4 * r * BF16, 4 * h, True)
        t.add("GEMM backward (dt_projs)", 4 * h * 2 + m * 4 * r * BF16, m * 4 * r * F32, True)
    t.add("fused SS2D scan kernel: the states kept for the backward", 0, states, True)
    t.add("fused SS2D scan backward kernel", 4 * h + m * 4 * (r + 2 * n) * BF16 + 4 * h + states
          + (0 if low else 4 * h), 4 * h + parts + (0 if low else 4 * h), True)   # x, proj, dy, [dt]
    t.add("sum of dx over directions", 4 * h, h, True)
    t.add("sum of partial ddts, dB, dC over channel blocks", parts, parts / (d // block_d) / 2, True)
    ss2d_front_backward(t, m, layer, BF16, BF16 if fused_norms else F32, extra_add=False)


def block_rest(t, m, block, fused_norms=False):
    """A VSSBlock around its SS2D: norm, residual adds, norm2 and the MLP. ``fused_norms``: n = norm(x) and then
    (x + h, norm2(x + h)) in the add + LayerNorm kernels, the residual stream float32, n bfloat16."""
    c = block.norm.normalized_shape[0]
    if fused_norms:
        t.add("add + LayerNorm kernel (block norms)", m * c * F32, m * c * BF16)
        t.add("add + LayerNorm kernel (block norms)", m * c * (F32 + BF16), m * c * (F32 + BF16))
    else:
        layer_norm(t, "block norms", m, c, F32)
        t.add("residual add", m * c * (F32 + BF16), m * c * F32)
    if block.mlp is not None:
        hidden = block.mlp.fc1.out_features
        if not fused_norms:
            layer_norm(t, "block norms", m, c, F32)
        matmul(t, "fc1", m, c, hidden, BF16 if fused_norms else F32)
        t.add("GELU", m * hidden * BF16, m * hidden * BF16)
        matmul(t, "fc2", m, hidden, c, BF16)
        t.add("residual add", m * c * (F32 + BF16), m * c * F32)


def record_shapes(model, batch, img):
    """Run the model on the meta device at batch 1; returns [(kind, module, input shape, output shape)] in call
    order, the batch dimension set to ``batch`` (every shape is linear in it)."""
    calls, hooks = [], []
    kinds = {vmamba.SS2D: "ss2d", vmamba.VSSBlock: "block"}
    for module in model.modules():
        kind = kinds.get(type(module))
        if kind is None and isinstance(module, torch.nn.Conv2d) and module.groups == 1:
            kind = "conv"   # the stem's and the downsampling convolutions
        if kind is not None:
            hooks.append(module.register_forward_hook(
                lambda mod, args, out, kind=kind: calls.append(
                    (kind, mod, (batch, *args[0].shape[1:]), (batch, *out.shape[1:])))))
    with torch.no_grad():
        model(torch.empty(1, 3, img, img, device="meta"))
    for h in hooks:
        h.remove()
    return calls


def model_bytes(name, batch, img):
    with torch.device("meta"):
        model = vmamba.create_model(name).eval()
    calls = record_shapes(model, batch, img)
    fused = {block.op: fuses_norms(block) for block in model.modules() if isinstance(block, vmamba.VSSBlock)}
    norms = {}   # each stem / downsampling convolution: (the LayerNorm before it, the one after it) in its Sequential
    for seq in model.modules():
        if isinstance(seq, torch.nn.Sequential):
            mods = list(seq)
            for i, conv in enumerate(mods):
                if isinstance(conv, torch.nn.Conv2d):
                    found = [[m for m in part if isinstance(m, vmamba.LayerNorm)] + [None]
                             for part in (mods[:i][::-1], mods[i:])]
                    norms[conv] = found[0][0], found[1][0]
    tallies, backward, elements = {"old": Tally(), "new": Tally()}, {"old": Tally(), "new": Tally()}, 0
    for kind, module, shape, out in calls:
        for path, t in tallies.items():
            if kind == "ss2d":   # (B, H, W, C) in
                m = shape[0] * shape[1] * shape[2]
                if path == "new":
                    ss2d_new(t, m, module, fused[module])
                    ss2d_new_backward(backward[path], m, module, fused[module])
                else:
                    ss2d_old(t, m, module)
                    ss2d_old_backward(backward[path], m, module)
            elif kind == "block":   # (B, C, H, W) or (B, H, W, C) in
                rows = shape[0] * (shape[2] * shape[3] if module.channel_first else shape[1] * shape[2])
                block_rest(t, rows, module, path == "new" and fuses_norms(module))
            else:   # a convolution with its following LayerNorm (stem, downsampling)
                rows_in, rows_out = shape[0] * shape[2] * shape[3], out[0] * out[2] * out[3]
                before, after = norms[module]
                low = path == "new" and before is not None and before.narrow   # after the stem's first norm and GELU
                if before is not None:   # the stem's GELU between its convolutions
                    size = rows_in * shape[1] * (BF16 if low else F32)
                    t.add("GELU (stem)", size, size)
                if not low:
                    t.add("cast to bfloat16 (convs)", rows_in * shape[1] * F32, rows_in * shape[1] * BF16)
                t.add("conv2d (stem, downsampling)", rows_in * shape[1] * BF16, rows_out * out[1] * BF16)
                if path == "new":   # the add + LayerNorm kernel without the add: float32 out, bfloat16 if narrow
                    t.add("LayerNorm kernel (stem and downsampling norms)", rows_out * out[1] * BF16,
                          rows_out * out[1] * (BF16 if after.narrow else F32))
                else:
                    layer_norm(t, "stem and downsampling norms", rows_out, out[1], BF16)
        if kind == "ss2d":
            elements += shape[0] * shape[1] * shape[2] * module.d_inner
    return tallies, backward, elements, len([c for c in calls if c[0] == "ss2d"])


def kernel_rows(tallies, elements):
    rows = []
    for kernel in sorted(set(tallies["old"].bytes) | set(tallies["new"].bytes),
                         key=lambda k: -max(tallies["old"].bytes.get(k, 0), tallies["new"].bytes.get(k, 0))):
        row = dict(kernel=kernel, ss2d=kernel in tallies["old"].ss2d | tallies["new"].ss2d)
        for path, t in tallies.items():
            row[f"{path}_calls"], row[f"{path}_gb"] = t.calls.get(kernel, 0), t.bytes.get(kernel, 0.0) / 1e9
            row[f"{path}_per_element"] = t.bytes.get(kernel, 0.0) / elements
        rows.append(row)
    return rows


def report(name, batch, img):
    tallies, backward, elements, layers = model_bytes(name, batch, img)
    totals = {path: dict(ss2d_per_element=t.total(True) / elements, model_gb=t.total() / 1e9,
                         model_per_element=t.total() / elements, model_ms_at_bandwidth=t.total() / BANDWIDTH * 1e3,
                         launches=sum(t.calls.values()),
                         ss2d_backward_per_element=backward[path].total(True) / elements,
                         ss2d_training_per_element=(t.total(True) + backward[path].total(True)) / elements)
              for path, t in tallies.items()}
    return dict(model=name, batch=batch, img=img, dtype="bfloat16 autocast", ss2d_layers=layers,
                map_elements=elements, kernels=kernel_rows(tallies, elements),
                backward_kernels=kernel_rows(backward, elements), totals=totals)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vmamba_tiny_s1l8")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--markdown", type=Path, default=None, help="also write them as a page (docs/)")
    args = parser.parse_args(argv)
    data = report(args.model, args.batch, args.img)
    old, new = data["totals"]["old"], data["totals"]["new"]
    lines = [f"{data['model']}, batch {data['batch']}, {data['img']} px, {data['dtype']}: {data['ss2d_layers']} SS2D "
             f"layers, {data['map_elements'] / 1e6:.0f}M map elements a step. Old: the path before the fused "
             "kernels; new: this vmamba.py. * marks the SS2D layer's kernels.", "",
             "| kernel | old GB | old B/element | new GB | new B/element | calls old/new |", "|---|---|---|---|---|---|"]
    table = lambda rows: [f"| {('* ' if r['ss2d'] else '') + r['kernel']} | {r['old_gb']:.2f} | "
                          f"{r['old_per_element']:.1f} | {r['new_gb']:.2f} | {r['new_per_element']:.1f} | "
                          f"{r['old_calls']}/{r['new_calls']} |" for r in rows]
    lines += table(data["kernels"])
    lines += ["", f"SS2D layer: {old['ss2d_per_element']:.1f} -> {new['ss2d_per_element']:.1f} bytes per element.",
              f"Whole model: {old['model_gb']:.1f} -> {new['model_gb']:.1f} GB per step "
              f"({old['model_per_element']:.0f} -> {new['model_per_element']:.0f} bytes per element; "
              f"{old['model_ms_at_bandwidth']:.1f} -> {new['model_ms_at_bandwidth']:.1f} ms at {BANDWIDTH / 1e12:.0f} TB/s; "
              f"{old['launches']} -> {new['launches']} kernel launches)."]
    lines += ["", "Training: the SS2D layers' backward (autograd of each path; the rest of the model's backward is "
              "the same in both and not counted).", "", lines[2], lines[3]] + table(data["backward_kernels"])
    lines += ["", f"SS2D layer backward: {old['ss2d_backward_per_element']:.1f} -> "
              f"{new['ss2d_backward_per_element']:.1f} bytes per element; forward + backward: "
              f"{old['ss2d_training_per_element']:.1f} -> {new['ss2d_training_per_element']:.1f}."]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    if args.markdown:
        command = "python tools/bytes_model.py " + " ".join(argv if argv is not None else sys.argv[1:])
        head = ["# HBM bytes per step: SS2D's fused Triton path against the one before it", "",
                f"`{command.strip()}` on {datetime.date.today()}, torch {torch.__version__}, Python "
                f"{platform.python_version()} (a model from the launch shapes, no GPU involved; see the script's "
                "docstring for what it counts).", ""]
        args.markdown.write_text("\n".join(head + lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
