"""VMamba: Visual State Space Model (Liu et al., NeurIPS 2024, arXiv:2401.10166), in one file.

A vision backbone that replaces attention with SS2D: each feature map is read as four 1-D sequences
(row-major, column-major, both reversed), each goes through a Mamba-1 selective scan, and the results
are summed back onto the pixels (cost linear in the pixel count). Needs only ``torch``;
runs the released checkpoints exactly, anywhere with a chunked pure-PyTorch scan (``torch.compile``,
``torch.export``, ONNX friendly), on CUDA with Triton or compiled ``mamba_ssm`` kernels. Usage::

    import vmamba
    model = vmamba.vmamba_tiny_s1l8(pretrained=True).eval()    # ImageNet-1K, 82.6% top-1
    logits = model(torch.randn(1, 3, 224, 224))                 # (1, 1000)
    backbone = vmamba.create_model("vmamba_tiny_s1l8", features_only=True)
    features = backbone(torch.randn(1, 3, 512, 512))            # 4 maps, strides 4..32
    vmamba.load_pretrained(model, "https://host/ckpt.pth")      # any released layout

Run ``python vmamba.py`` for an offline smoke test, ``python vmamba.py --help`` for more. License: MIT."""

from __future__ import annotations

import argparse, contextlib, difflib, functools, hashlib, json, math, operator, os, pickle, re, sys, time, types
import warnings, weakref, zipfile
import importlib.util, inspect, urllib.parse, urllib.request
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch, torch.nn as nn, torch.nn.functional as F
from torch import Tensor

__all__ = [  # kernels, model, checkpoints, zoo and ecosystem
    "selective_scan", "selective_scan_ref", "cross_scan", "cross_merge", "ss2d_core", "available_backends",
    "set_backend", "SS2D", "VSSBlock", "VSSM", "Backbone_VSSM", "load_pretrained", "checkpoint_filter_fn",
    "load_checkpoint_file", "download_cached", "save_weights", "PickledObject", "list_models",
    "create_model", "model_config", "pretrained_url", "EVAL_CONFIG", "vanilla_vmamba_tiny",
    "vanilla_vmamba_small", "vanilla_vmamba_base", "vmamba_tiny_s2l5", "vmamba_small_s2l15", "vmamba_base_s2l15",
    "vmamba_tiny_s1l8", "vmamba_small_s1l20", "vmamba_base_s1l20", "register_timm", "register_mm"]

# --- Optional accelerated kernels: a missing one is an error only once asked for by name.
try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except Exception:  # ImportError, or an "undefined symbol" OSError from a broken build
    _mamba_selective_scan_fn = None
# triton is imported on first use (importing it takes ~0.4 s), by _triton_kernels().
_HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ("auto", "torch", "triton", "mamba_ssm")
_INSTALL_HINTS = {"mamba_ssm": "pip install mamba-ssm --no-build-isolation (needs a CUDA toolkit matching torch)",
                  "triton": "pip install triton (Linux; ships with the CUDA builds of torch)"}
# Custom-op namespace; per module name, so "python vmamba.py" and "import vmamba" can coexist.
_OPS_NS = "vmamba_" + re.sub(r"\W", "_", __name__)
_forced_backend, _LAYERS = None, weakref.WeakSet()   # set_backend's choice (None: restored), the layers it tells


def _warn_once(message: str, _seen: set = set()) -> None:
    if message not in _seen:
        _seen.add(message)
        warnings.warn(message, stacklevel=3)


# --- Selective scan: the float64 reference and the chunked pure-PyTorch scan (backend "torch").
def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                       z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                       delta_softplus: bool = False, return_last_state: bool = False):
    """Grouped Mamba-1 selective scan, one step at a time, in float64: the (slow) test oracle.
    Shapes (G groups of D channels, state size N, length L): u, delta, z (gate) (B, G*D, L);
    A (G*D, N) negative decay rates; B, C (B, G, N, L) or (B, N, L), shared by a group, or (G*D, N), one per
    channel for every step (mamba_ssm's constant B, C); D (skip), delta_bias (G*D,) optional. With
    ``dt = softplus(delta + delta_bias)`` (or no softplus)::
        h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   h_0 = 0
        y_t = (<C_t, h_t> + D * u_t) * silu(z_t)

    Returns y as float64 (B, G*D, L), or ``(y, h_L)`` with ``return_last_state``."""
    (batch, channels, length), u, delta, A = u.shape, u.double(), delta.double(), A.double()
    B, C = (t.double()[None, :, :, None].expand(batch, -1, -1, length) if t.dim() == 2 else t.double()
            for t in (B, C))
    B, C = (t.unsqueeze(1) if t.dim() == 3 else t for t in (B, C))
    B, C = (t.repeat_interleave(channels // t.shape[1], dim=1) for t in (B, C))  # (B, G*D, N, L)
    delta = delta if delta_bias is None else delta + delta_bias.double()[:, None]
    dt = F.softplus(delta) if delta_softplus else delta
    h, ys = u.new_zeros(u.shape[0], channels, A.shape[1]), []          # (B, G*D, N)
    for dt_t, u_t, b_t, c_t in zip(dt.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1)):
        h = torch.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * b_t
        ys.append((h * c_t).sum(-1))
    y = torch.stack(ys, dim=-1)                                        # (B, G*D, L)
    y = y if D is None else y + D.double()[:, None] * u
    y = y if z is None else y * F.silu(z.double())
    return (y, h) if return_last_state else y


# The torch scan works channels-last, (B, L, G, D), states (B, G, N, D): every step is a (B, chunks, G, [N,] D) view
# with D contiguous, so each op (and each loop torch.compile generates) runs along channels. The sequence is cut into
# chunks of T steps (T up to _CHUNK, half that compiled, where steps unroll; a divisor of L if one is near, else the end
# is zero-padded); a multiply-add advances every chunk a step. Pass 1 gives each chunk's exit state from zero, a log-
# depth scan over chunks (decay exp(A * sum of dt)) the entry states, pass 2 the outputs; autograd, the backward (linear
# in L). Channels go in even blocks: a step touches ~_STEP_STATES states (in cache; twice that compiled), a
# (B, L, G, width) tensor at most _BLOCK_FLOATS floats (16 MiB: glibc maps a block of 32 MiB or more anew each call).
_CHUNK, _STEP_STATES, _BLOCK_FLOATS = 16, 1 << 20, 1 << 22


def _softplus(x: Tensor) -> Tensor:
    """F.softplus; compiled without autograd max(x, 0) + log(w) + (z - (w - 1)) / w, z = exp(-|x|), w = 1 + z, exact
    to float32 rounding, fused exp and log (compiled float32 log1p runs 5-10x slower on some AVX-512 CPUs)."""
    if x.requires_grad or not torch.compiler.is_compiling():  # eager: one pass; the formula's seven cost more
        return F.softplus(x)
    z = torch.exp(-x.abs())
    w = 1 + z
    return x.clamp_min(0) + torch.log(w) + (z - (w - 1)) / w


def _shifted(t: Tensor, s: int, fill: float) -> Tensor:  # t[:, c - s] at c along dim 1; fill where c < s
    return F.pad(t[:, :t.shape[1] - s], (0, 0) * (t.dim() - 2) + (s, 0), value=fill)


def _chunk_carries(E: Tensor, S: Tensor) -> Tensor:
    """Inclusive scan of h_c = E_c^2 * h_{c-1} + S_c along dim 1 (h_{-1} = 0), in log2 steps. E, the square root of
    a chunk's decay, is capped at float32's largest value: a product of growing chunks (dt*A > 0) may overflow where
    the states do not, and inf times a zero carry would be NaN. A carry is multiplied by E twice, so each result is
    exact if it fits float32, inf if it cannot (a normal nonzero float32 times 3.4e38^2 overflows)."""
    n, s = S.shape[1], 1
    while s < n:  # after this step, h_c sums the terms of chunks c-2s+1..c
        S = torch.addcmul(S, E, E * _shifted(S, s, 0.0))
        E = (E * _shifted(E, s, 1.0)).clamp_max(torch.finfo(E.dtype).max) if 2 * s < n else E
        s *= 2
    return S


def _scan_chunks(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, b_plan: int,
                 h0: Optional[Tensor] = None, growth: bool = True) -> Tuple[Tensor, Tensor]:
    """The chunked scan of float32 channels-last inputs, dt final, A (G, N, D): y (B, L, G, D), last (B, G, N, D).
    ``h0`` (B, G, N, D): the state before the first step (default 0), e.g. the last one of the previous tile.
    ``growth=False`` where no step can grow (the model's dt >= 0, A < 0): its decays skip their cap."""
    (b, L, g, d), n, top = u.shape, A.shape[1], _CHUNK // 2 if torch.compiler.is_compiling() else _CHUNK
    T = min(L, next((t for t in range(top, top // 3, -1) if L % t == 0), top))
    nc = (L + T - 1) // T  # not -(-L // T): the legacy ONNX exporter mis-traces that form
    if nc * T != L:  # padded steps have dt = 0: no decay, no input
        u, dt, B, C = (F.pad(t, (0, 0, 0, 0, 0, nc * T - L)) for t in (u, dt, B, C))

    def steps(t: Tensor) -> Sequence[Tensor]:  # (B, nc*T, G, ...) -> T views (B, nc, G, ...)
        return t.view(b, nc, T, *t.shape[2:]).unbind(2)
    Cs = steps(C.unsqueeze(-1))                                       # (B, nc, G, N, 1) each; states (..., N, D)
    # Decays a_t and inputs x_t: at once when they fit in cache (for b_plan samples) or at N=1 under autograd (a
    # small graph); else at N=1 once per step, kept for pass 2, which drops them as it goes; else (N > 1, or compiled,
    # where the passes fuse them) in each pass's step, reading only dt, dt*u and B.
    # Decays are capped at float32's max: a zero state times a step's growth beyond it (dt*A > 88.7) stays 0, not NaN.
    decay = (lambda z: torch.exp(z).clamp_max(torch.finfo(z.dtype).max)) if growth else torch.exp
    if 2 * b_plan * L * g * d * n <= _STEP_STATES or (n == 1 and dt.requires_grad):
        a_s = list(steps(decay(dt.unsqueeze(-2) * A)))
        x_s = list(steps((dt * u).unsqueeze(-2) * B.unsqueeze(-1)))
    elif n == 1 and not torch.compiler.is_compiling():
        dts, us, Bs = steps(dt.unsqueeze(-2)), steps(u.unsqueeze(-2)), steps(B.unsqueeze(-1))
        a_s, x_s = [decay(t * A) for t in dts], [t * v * w for t, v, w in zip(dts, us, Bs)]
    else:
        (dts, dus, Bs), a_s = (steps(t) for t in (dt.unsqueeze(-2), (dt * u).unsqueeze(-2), B.unsqueeze(-1))), None
    def step(t: int, h: Tensor) -> Tensor:                            # h_t = a_t * h_{t-1} + x_t, (B, nc, G, N, D)
        a = a_s[t] if a_s else decay(dts[t] * A)
        return torch.addcmul(x_s[t] if a_s else dus[t] * Bs[t], a, h)
    h0 = None if h0 is None else F.pad(h0.unsqueeze(1), (0, 0) * 3 + (0, nc - 1))   # h0 enters chunk 0 only
    h = (x_s[0] if a_s else dus[0] * Bs[0]) if h0 is None else step(0, h0)   # pass 1: exit states from zero (h0)
    for t in range(1, T):
        h = step(t, h)
    H = _chunk_carries(torch.exp((dt.view(b, nc, T, g, d).sum(2).unsqueeze(-2) * (A / 2)).clamp_max(88.72)),
                       h)   # (B, nc, G, N, D); square roots of the chunks' decays, below float32's max (3.4e38)
    h, hs = _shifted(H, 1, 0.0) if h0 is None else _shifted(H, 1, 0.0) + h0, []   # pass 2, from the entry states
    for t in range(T):
        h = step(t, h)
        if a_s:
            a_s[t] = x_s[t] = None
        hs.append(h * Cs[t] if n == 1 else (h * Cs[t]).sum(-2))       # (B, nc, G[, 1], D)
    return torch.stack(hs, 2).view(b, nc * T, g, d)[:, :L], H[:, -1]   # (B, L, G, D), (B, G, N, D)


def _plan(b: Any, L: int, g: int, n: int, d: int) -> Tuple[int, int]:   # samples to plan for, channels per block
    b_plan = b if isinstance(b, int) else 1   # a symbolic batch (export, dynamic compile): plan for one sample
    size, states = b_plan * L * g * d, _STEP_STATES * _CHUNK   # floats in a (B, L, G, D) tensor; states per block
    blocks = max((size + _BLOCK_FLOATS - 1) // _BLOCK_FLOATS, (size * n + states - 1) // states)
    return b_plan, (d + blocks - 1) // blocks


def _tile_rows(x: Any, width: int, n: int = 1, forced: Optional[int] = None, hw: Tuple[int, int] = (1, 2),
               stride: int = 1) -> Optional[int]:
    """How a large map is tiled, decided from its shape alone (the one place): for the (B, H, W) map whose sizes are
    x.shape[hw] (columns: swap them), divided by ``stride``, with ``width`` floats a pixel, the rows per tile: the most
    whose (B, rows, W, width) tensors hold at most _BLOCK_FLOATS floats and whose scan steps touch at most
    _STEP_STATES states of size n, at least one; ``forced`` (a model's ``tile_rows``) in their place. None (no tiles)
    when one tile holds the map, under autograd (tiles serve inference) or without static sizes (FX tracing)."""
    if torch.is_grad_enabled() or not isinstance(x, Tensor):
        return None
    b, h, w = x.shape[0], x.shape[hw[0]], x.shape[hw[1]]
    if not (isinstance(h, int) and isinstance(w, int)):
        return None
    h, w = (h + stride - 1) // stride, (w + stride - 1) // stride
    per_row = (b if isinstance(b, int) else 1) * w * width
    rows = forced or min(_BLOCK_FLOATS // per_row, _STEP_STATES * _CHUNK // (per_row * n))
    return max(rows, 1) if rows < h else None


def _selective_scan_torch(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          growth: bool = True) -> Tuple[Tensor, Tensor]:
    """Backend "torch", channels-last: u, dt (B, L, G, D), dt final (bias and softplus applied); A (G, D, N);
    B, C (B, L, G, N). Returns y (B, L, G, D) without the D term and the last state (B, G, D, N), float32."""
    (b, L, g, d), n = u.shape, A.shape[-1]
    (b_plan, width), u, dt, B, C = _plan(b, L, g, n, d), u.float(), dt.float(), B.float(), C.float()
    A = A.float().transpose(1, 2)                                     # (G, N, D)
    blocks = zip(u.split(width, 3), dt.split(width, 3), A.split(width, 2))   # channel blocks of u, dt, A
    # N > 1 under autograd: each block's steps are recomputed in backward (kept, they would hold ~4 floats a state)
    recompute = n > 1 and torch.is_grad_enabled() and not (torch.compiler.is_compiling() or torch.jit.is_tracing())
    ys, lasts = zip(*[torch.utils.checkpoint.checkpoint(_scan_chunks, *t, B, C, b_plan, None, growth,
                                                        use_reentrant=False)
                      if recompute else _scan_chunks(*t, B, C, b_plan, None, growth) for t in blocks])
    y, last = (ys[0], lasts[0]) if len(ys) == 1 else (torch.cat(ys, 3), torch.cat(lasts, 3))   # channel blocks
    return y, last.transpose(2, 3)                                    # (B, L, G, D), (B, G, D, N)


# --- Triton kernels and custom ops (with fakes and autograd, for torch.compile); CPU: TRITON_INTERPRET=1. The kernels
# are defined on first use by _triton_kernels() (below), so that importing vmamba imports no triton.
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _scan_blocks(D: int, N: int, L: int) -> Tuple[int, int, int]:
    """Tile sizes of _scan_fwd_kernel: a program owns BLOCK_D channels of a group, walking L in chunks of BLOCK_L
    (~2048 float32 per tile). The one place to tune."""
    block_n = _next_pow2(N)
    block_d = min(_next_pow2(D), max(2, 32 // block_n))
    block_l = max(16, min(_next_pow2(L), 2048 // (block_d * block_n)))
    return block_d, block_n, block_l


def _define_triton_kernels() -> Dict[str, Any]:  # run by _triton_kernels(), with triton and tl in its globals

    @triton.jit
    def _affine_combine(e1, b1, e2, b2):
        """Compose two steps of h -> e*e*h + b: first (e1, b1), then (e2, b2). e, the square root of a decay, is
        capped at float32's largest value, so with growth (dt*A > 0) a product over many steps stays finite (inf
        times a zero state would be NaN), and e*(e*b) is exact if it fits float32, inf if a normal b cannot."""
        return tl.minimum(e1 * e2, 3.4028234663852886e38), e2 * (e2 * b1) + b2

    @triton.jit
    def _softplus_tl(z):
        """log(1 + exp(z)) in float32, linear above 20, no log(1+x) cancellation for very negative z."""
        ez = tl.exp(tl.minimum(z, 20.0))
        small = ez - 0.5 * ez * ez + ez * ez * ez / 3.0  # log1p series, |error| < ez^4/4
        return tl.where(z > 20.0, z, tl.where(ez < 1e-3, small, tl.log(1.0 + ez)))

    @triton.jit
    def _scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, Dskip_ptr, bias_ptr, y_ptr, states_ptr,
                         L, N, D, K, n_chunks, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
        """Selective-scan forward; grid (batch * K, cdiv(D, BLOCK_D)). Contiguous inputs: u, delta (B, K*D, L); A
        (K*D, N); B, C (B, K, N, L); Dskip, bias (K*D,). Outputs (float32): y (B, K*D, L); the last states (B, K*D,
        N). Per chunk of BLOCK_L steps, h_s = a_s h_{s-1} + b_s is an associative scan."""
        pid_bk, pid_d = tl.program_id(0), tl.program_id(1)
        b, k = pid_bk // K, pid_bk % K
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n, offs_l = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_L)
        d_mask, n_mask = offs_d < D, offs_n < N
        chan = k * D + offs_d                                  # (BD,) global channel index
        dn_mask = d_mask[:, None] & n_mask[None, :]
        # Padded states get A = 0 and B = 0, so they stay exactly 0.
        A = tl.load(A_ptr + chan[:, None] * N + offs_n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
        if HAS_D:
            Dskip = tl.load(Dskip_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)
        row = (b * K * D + chan).to(tl.int64) * L              # (BD,) start of each u/delta row
        bc_row = ((b * K + k) * N + offs_n).to(tl.int64) * L    # (BN,) start of each B/C row
        is_last = (offs_l == BLOCK_L - 1)[None, None, :]
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for c in range(n_chunks):
            s = c * BLOCK_L + offs_l
            s_mask = s < L
            dl_mask, nl_mask = d_mask[:, None] & s_mask[None, :], n_mask[:, None] & s_mask[None, :]
            u = tl.load(u_ptr + row[:, None] + s[None, :], mask=dl_mask, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + row[:, None] + s[None, :], mask=dl_mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias[:, None]
            dt = _softplus_tl(dt) if SOFTPLUS else dt
            dt = tl.where(dl_mask, dt, 0.0)                     # padded steps: identity map
            Bv = tl.load(B_ptr + bc_row[:, None] + s[None, :], mask=nl_mask, other=0.0).to(tl.float32)
            Cv = tl.load(C_ptr + bc_row[:, None] + s[None, :], mask=nl_mask, other=0.0).to(tl.float32)
            e = tl.minimum(tl.exp(dt[:, None, :] * A[:, :, None] * 0.5), 3.4028234663852886e38)   # (BD, BN, BL)
            bx = (dt * u)[:, None, :] * Bv[None, :, :]          # (BD, BN, BL)
            pe, pb = tl.associative_scan((e, bx), axis=2, combine_fn=_affine_combine)
            hs = pe * (pe * h[:, :, None]) + pb                 # h_s for every step of the chunk
            y = tl.sum(hs * Cv[None, :, :], axis=1)             # (BD, BL)
            if HAS_D:
                y += Dskip[:, None] * u
            tl.store(y_ptr + row[:, None] + s[None, :], y, mask=dl_mask)
            # Padded tail steps are identities, so the last column is the state after the chunk.
            h = tl.sum(tl.where(is_last, hs, 0.0), axis=2)
        tl.store(states_ptr + (b * K * D + chan)[:, None].to(tl.int64) * N + offs_n[None, :], h, mask=dn_mask)

    @triton.jit
    def _rows(ptrs, stride, mask, n: tl.constexpr, BLOCK: tl.constexpr):
        """(BLOCK, BD): row i < n loaded from ptrs + i * stride (ptrs, mask (BD,)), zeros below; a load per row keeps a
        channel per thread (a 2-D load is spread along its contiguous dim, then converted through shared memory)."""
        offs, out = tl.arange(0, BLOCK)[:, None], tl.zeros((BLOCK, ptrs.shape[0]), dtype=ptrs.dtype.element_ty)
        for i in tl.static_range(n):
            out = tl.where(offs == i, tl.load(ptrs + i * stride, mask=mask, other=0.0)[None, :], out)
        return out

    @triton.jit
    def _ss2d_pixel(x_ptr, proj_ptr, dt_ptr, row, k, D, offs_d, ok, R: tl.constexpr, N: tl.constexpr,
                    LOW_RANK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """What direction k needs at pixel ``row`` (of B*H*W): u (BD,), the low-rank dts (BR, BD) or dt (BD,), B and
        C (BN, BD), as stored; each thread reads the dts, B and C of the pixel. ``ok``: the pixel exists."""
        d_ok, same = (offs_d < D) & ok, proj_ptr + (row * 4 + k) * (R + 2 * N) + offs_d * 0   # its proj row
        u = tl.load(x_ptr + row * D + offs_d, mask=d_ok, other=0.0)
        dt = _rows(same, 1, ok, R, BLOCK_R) if LOW_RANK else tl.load(dt_ptr + (row * 4 + k) * D + offs_d, mask=d_ok)
        return u, dt, _rows(same + R, 1, ok, N, BLOCK_N), _rows(same + R + N, 1, ok, N, BLOCK_N)

    @triton.jit
    def _ss2d_weights(w_ptr, bias_ptr, A_ptr, Ds_ptr, k, D, offs_d, R: tl.constexpr, N: tl.constexpr,
                      LOW_RANK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """Direction k's A = -exp(A_logs) (BN, BD; 0 where padded), dt bias (BD,), dt weights (BR, BD; 0 unless
        LOW_RANK) and skip weights (BD,), float32, from the layer's A_logs (4*D, N), bias (4, D), w (4, D, R) and Ds
        (4*D,) in any dtype."""
        RW: tl.constexpr = R if LOW_RANK else 0
        chan, d_mask = k * D + offs_d, offs_d < D
        A = -tl.exp(_rows(A_ptr + chan * N, 1, d_mask, N, BLOCK_N).to(tl.float32))
        A = tl.where((tl.arange(0, BLOCK_N) < N)[:, None] & d_mask[None, :], A, 0.0)
        bias = tl.load(bias_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)
        skip = tl.load(Ds_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)
        return A, bias, _rows(w_ptr + chan * R, 1, d_mask, RW, BLOCK_R).to(tl.float32), skip

    @triton.jit
    def _ss2d_ckpt(ckpt_ptr, L, T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """(BLOCK_D,) pointers to this program's first state in ckpt: rows BLOCK_D apart, the next state after it."""
        prog = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64)
        return ckpt_ptr + prog * tl.cdiv(L, T) * BLOCK_N * BLOCK_D + tl.arange(0, BLOCK_D)

    @triton.jit
    def _put_rows(ptrs, x, stride, BLOCK: tl.constexpr):
        """Row i of x (BLOCK, BD) to ptrs + i * stride, ptrs (BD,): _rows' store (a channel per thread, no shuffles)."""
        for i in tl.static_range(BLOCK):
            tl.store(ptrs + i * stride, tl.sum(tl.where(tl.arange(0, BLOCK)[:, None] == i, x, 0.0), axis=0))

    @triton.jit
    def _ss2d_fwd_kernel(x_ptr, proj_ptr, dt_ptr, w_ptr, bias_ptr, A_ptr, Ds_ptr, y_ptr, ckpt_ptr, H, W, D,
                         R: tl.constexpr, N: tl.constexpr, LOW_RANK: tl.constexpr, T: tl.constexpr, SAVE: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """SS2D's four scans read straight from the map; grid (batch * 4, cdiv(D, BLOCK_D)). A program walks direction
        k of a sample pixel by pixel, its (BLOCK_N, BLOCK_D) states in registers, loading the next pixel while it
        computes this one. x (B, H, W, D); proj (B, H, W, 4, R + 2N): dts, B, C; LOW_RANK: dt = softplus(w @ dts +
        bias) here, else read from dt (B, H, W, 4, D); weights as the layer holds them. Writes y (B, H, W, 4, D), with
        the skip term Ds[k] * u, in x's dtype at the pixels read; SAVE: the state before every T-th step in ckpt
        (programs, L/T, BLOCK_N, BLOCK_D)."""
        pid, offs_d = tl.program_id(0), tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        b, k, L, d_mask = pid // 4, pid % 4, H * W, offs_d < D
        A, bias, w, skip = _ss2d_weights(w_ptr, bias_ptr, A_ptr, Ds_ptr, k, D, offs_d, R, N, LOW_RANK, BLOCK_N, BLOCK_R)
        A *= 1.4426950408889634                                 # exp(dt*A) = exp2(dt * A*log2(e))
        step, p = (1 + (k % 2) * (W - 1)) * (1 - 2 * (k // 2)), (k // 2) * (L - 1)   # +-1 or +-W; from 0 or L - 1
        nxt = _ss2d_pixel(x_ptr, proj_ptr, dt_ptr, (b * L + p).to(tl.int64), k, D, offs_d, True, R, N, LOW_RANK,
                          BLOCK_N, BLOCK_R)
        h, ckpt = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), _ss2d_ckpt(ckpt_ptr, L, T, BLOCK_N, BLOCK_D)
        for t in range(L):
            if SAVE:
                if t % T == 0:
                    _put_rows(ckpt + (t // T) * BLOCK_N * BLOCK_D, h, BLOCK_D, BLOCK_N)
            (u, dt, Bv, Cv), row = nxt, (b * L + p).to(tl.int64)
            p += step                                           # the next pixel; past a column's end, the next column
            p = tl.where(p >= L, p - (L - 1), tl.where(p < 0, p + (L - 1), p))
            nxt = _ss2d_pixel(x_ptr, proj_ptr, dt_ptr, (b * L + p).to(tl.int64), k, D, offs_d, t + 1 < L, R, N,
                              LOW_RANK, BLOCK_N, BLOCK_R)
            dt = _softplus_tl((tl.sum(w * dt.to(tl.float32), axis=0) if LOW_RANK else dt.to(tl.float32)) + bias)
            h = tl.exp2(dt[None, :] * A) * h + (dt * u.to(tl.float32))[None, :] * Bv.to(tl.float32)
            y = tl.sum(h * Cv.to(tl.float32), axis=0) + skip * u.to(tl.float32)
            tl.store(y_ptr + (row * 4 + k) * D + offs_d, y.to(y_ptr.dtype.element_ty), mask=d_mask)

    @triton.jit
    def _ss2d_at(t, k, H, W):
        """The pixel (of H*W) at step t of direction k: row-major, column-major, both reversed."""
        s = tl.where(k >= 2, H * W - 1 - t, t)
        return tl.where(k % 2 == 0, s, (s % H) * W + s // H)

    @triton.jit
    def _ss2d_step(x_ptr, proj_ptr, dt_ptr, w, bias, A, h, row, k, D, offs_d, R: tl.constexpr, N: tl.constexpr,
                   LOW_RANK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """One step of _ss2d_fwd_kernel's recurrence from state h at pixel ``row``: u, dts, B, C (float32), the
        pre-softplus dt z, the decays a and the new state."""
        u, raw, Bv, Cv = _ss2d_pixel(x_ptr, proj_ptr, dt_ptr, row, k, D, offs_d, True, R, N, LOW_RANK, BLOCK_N,
                                     BLOCK_R)
        u, raw, Bv = u.to(tl.float32), raw.to(tl.float32), Bv.to(tl.float32)
        z = (tl.sum(w * raw, axis=0) if LOW_RANK else raw) + bias
        dt = _softplus_tl(z)
        a = tl.exp(dt[None, :] * A)
        return u, raw, Bv, Cv.to(tl.float32), z, a, a * h + (dt * u)[None, :] * Bv

    @triton.jit
    def _ss2d_bwd_kernel(x_ptr, proj_ptr, dt_ptr, w_ptr, bias_ptr, A_ptr, Ds_ptr, dy_ptr, ckpt_ptr, hs_ptr, dx_ptr,
                         part_ptr, ddt_ptr, dw_ptr, dbias_ptr, dA_ptr, dDs_ptr, H, W, D, dy_pix, dy_k, R: tl.constexpr,
                         N: tl.constexpr, LOW_RANK: tl.constexpr, T: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """_ss2d_fwd_kernel's backward, same grid and pixels; dy at row * dy_pix + k * dy_k. From the states the forward
        kept, a program takes direction k's segments of T steps, last first, recomputes a segment's states (hs, its
        scratch) and walks them backwards with dh = dL/dh. Writes dx (B, H, W, 4, D) and, if not LOW_RANK, dL/dz (z: dt
        before softplus) in x's dtype; float32: part (B, H, W, 4, blocks, [R +] 2N), this channel block's sums of
        [ddts,] dB, dC; per sample dw (B, 4, D, R) (if LOW_RANK), dbias and dDs (B, 4, D), dA_logs (B, 4, N, D)."""
        pid, blk, blocks = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        offs_d, offs_n, offs_r = blk * BLOCK_D + tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_R)
        b, k, L, d_mask = pid // 4, pid % 4, H * W, offs_d < D
        A, bias, w, skip = _ss2d_weights(w_ptr, bias_ptr, A_ptr, Ds_ptr, k, D, offs_d, R, N, LOW_RANK, BLOCK_N, BLOCK_R)
        tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_D   # a state's rows in ckpt and hs (the forward's layout)
        n_seg, ckpt = tl.cdiv(L, T), _ss2d_ckpt(ckpt_ptr, L, T, BLOCK_N, BLOCK_D)[None, :] + tile
        hs = _ss2d_ckpt(hs_ptr, T * T, T, BLOCK_N, BLOCK_D)[None, :] + tile   # T states a program: a segment's
        dh, dA, dbias, dw, dskip = tl.zeros_like(A), tl.zeros_like(A), tl.zeros_like(bias), tl.zeros_like(w), 0 * skip
        RP: tl.constexpr = R if LOW_RANK else 0                 # where dB starts in part
        for i in range(n_seg):
            start = (n_seg - 1 - i) * T
            h = tl.load(ckpt + (n_seg - 1 - i) * BLOCK_N * BLOCK_D)
            n = tl.minimum(T, L - start)
            for j in range(n):                                  # the segment's states, h before step start + j
                tl.store(hs + j * BLOCK_N * BLOCK_D, h)
                h = _ss2d_step(x_ptr, proj_ptr, dt_ptr, w, bias, A, h, (b * L + _ss2d_at(start + j, k, H, W)).to(
                    tl.int64), k, D, offs_d, R, N, LOW_RANK, BLOCK_N, BLOCK_R)[6]
            for j in range(n):                                  # backwards: dh enters as a_{t+1} * dL/dh_{t+1}
                row = (b * L + _ss2d_at(start + n - 1 - j, k, H, W)).to(tl.int64)
                h_prev = tl.load(hs + (n - 1 - j) * BLOCK_N * BLOCK_D)
                u, raw, Bv, Cv, z, a, h = _ss2d_step(x_ptr, proj_ptr, dt_ptr, w, bias, A, h_prev, row, k, D, offs_d,
                                                     R, N, LOW_RANK, BLOCK_N, BLOCK_R)
                dy = tl.load(dy_ptr + row * dy_pix + k * dy_k + offs_d, mask=d_mask, other=0.0).to(tl.float32)
                dt, dh = _softplus_tl(z), dh + dy[None, :] * Cv
                dhb, dah = tl.sum(dh * Bv, axis=0), dh * a * h_prev     # dL/d(dt u) / B, dL/d(dt A)
                dz = (tl.sum(dah * A, axis=0) + u * dhb) * tl.sigmoid(z)   # dL/dz, z the pre-softplus dt
                dA, dbias, dskip, at = dA + dah * dt[None, :], dbias + dz, dskip + dy * u, row * 4 + k
                tl.store(dx_ptr + at * D + offs_d, (dt * dhb + skip * dy).to(dx_ptr.dtype.element_ty), mask=d_mask)
                part = part_ptr + (at * blocks + blk) * (RP + 2 * N)
                if LOW_RANK:
                    dw += raw * dz[None, :]
                    tl.store(part + offs_r, tl.sum(w * dz[None, :], axis=1), mask=offs_r < R)
                else:
                    tl.store(ddt_ptr + at * D + offs_d, dz.to(ddt_ptr.dtype.element_ty), mask=d_mask)
                tl.store(part + RP + offs_n, tl.sum(dh * (dt * u)[None, :], axis=1), mask=offs_n < N)
                tl.store(part + RP + N + offs_n, tl.sum(h * dy[None, :], axis=1), mask=offs_n < N)
                dh = a * dh
        out, dn_mask = (b * 4 + k) * D + offs_d, (offs_n < N)[:, None] & d_mask[None, :]
        tl.store(dbias_ptr + out, dbias, mask=d_mask)
        tl.store(dDs_ptr + out, dskip, mask=d_mask)
        dA_logs = dA * A                                        # A = -exp(A_logs)
        tl.store(dA_ptr + (b * 4 + k) * N * D + offs_n[:, None] * D + offs_d[None, :], dA_logs, mask=dn_mask)
        if LOW_RANK:
            tl.store(dw_ptr + (b * 4 + k) * R * D + offs_r[:, None] + offs_d[None, :] * R, dw,
                     mask=(offs_r < R)[:, None] & d_mask[None, :])

    @triton.jit
    def _norm_rows(s, mask, C, eps):
        """(s_hat, rstd): each row of s (BLOCK_M, BLOCK_C) float32 normalised over its C columns (0 where masked)."""
        c = tl.where(mask, s - (tl.sum(s, axis=1) / C)[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=1) / C + eps)
        return c * rstd[:, None], rstd

    @triton.jit
    def _merge_norm_kernel(ys_ptr, z_ptr, w_ptr, b_ptr, out_ptr, m_ptr, rows, D, z_stride, eps, HAS_Z: tl.constexpr,
                           SAVE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """out = LayerNorm(m) (* silu(z)), m = sum_k ys[:, k], over D, BLOCK_M rows a program; grid cdiv(rows,
        BLOCK_M). ys (rows, 4, D), out (rows, D) contiguous, z rows z_stride apart; float32 inside, out ys's dtype;
        SAVE: m (rows, D) float32 too, which the backward normalises again (_add_norm_bwd_kernel)."""
        offs_m, offs_d = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
        col_ok, rows64 = offs_d < D, offs_m.to(tl.int64)[:, None]
        mask, at = (offs_m < rows)[:, None] & col_ok[None, :], rows64 * D + offs_d[None, :]
        m = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for k in tl.static_range(4):
            m += tl.load(ys_ptr + (rows64 * 4 + k) * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        if SAVE:
            tl.store(m_ptr + at, m, mask=mask)
        w, b = tl.load(w_ptr + offs_d, mask=col_ok), tl.load(b_ptr + offs_d, mask=col_ok)
        out = _norm_rows(m, mask, D, eps)[0] * w[None, :] + b[None, :]
        if HAS_Z:
            z = tl.load(z_ptr + rows64 * z_stride + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            out *= z * tl.sigmoid(z)
        tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_norm_kernel(x_ptr, h_ptr, w_ptr, b_ptr, s_ptr, n_ptr, rows, C, eps, HAS_H: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """s = x + h, written in s's dtype (HAS_H; else s = x), and n = LayerNorm(s) over C in n's dtype, BLOCK_M rows
        a program; grid cdiv(rows, BLOCK_M). x, h, s, n (rows, C) contiguous; float32 inside."""
        offs_m, offs_c = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_C)
        mask, at = (offs_m < rows)[:, None] & (offs_c < C)[None, :], offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
        s = tl.load(x_ptr + at, mask=mask, other=0.0)
        if HAS_H:   # s as stored, which the backward normalises again
            s = (s.to(tl.float32) + tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32)).to(s_ptr.dtype.element_ty)
            tl.store(s_ptr + at, s, mask=mask)
        s_hat = _norm_rows(s.to(tl.float32), mask, C, eps)[0]
        w, b = tl.load(w_ptr + offs_c, mask=offs_c < C).to(tl.float32), tl.load(b_ptr + offs_c, mask=offs_c < C)
        tl.store(n_ptr + at, (s_hat * w[None, :] + b.to(tl.float32)[None, :]).to(n_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_norm_bwd_kernel(s_ptr, dn_ptr, ds_ptr, w_ptr, dx_ptr, dh_ptr, dwb_ptr, rows, C, rows_per_program, eps,
                             HAS_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """Backward of _add_norm_kernel (and of the merge's norm, on the m it kept), rows_per_program rows (a multiple
        of BLOCK_M) a program: the gradient of s (the norm's, plus ds with HAS_H) written as dx (and dh) in their
        dtypes; the program's sums of dn * s_hat and of dn (its dw, db) in dwb[program] (programs, 2, C) float32,
        which the caller adds up."""
        offs_c = tl.arange(0, BLOCK_C)
        col_ok = offs_c < C
        w = tl.load(w_ptr + offs_c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        dw, db = tl.zeros((BLOCK_M, BLOCK_C), tl.float32), tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
        for i in range(0, rows_per_program, BLOCK_M):
            offs_m = tl.program_id(0) * rows_per_program + i + tl.arange(0, BLOCK_M)
            mask, at = (offs_m < rows)[:, None] & col_ok[None, :], offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
            s_hat, rstd = _norm_rows(tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32), mask, C, eps)
            dn = tl.load(dn_ptr + at, mask=mask, other=0.0).to(tl.float32)
            dw, db, g = dw + dn * s_hat, db + dn, dn * w
            ds = (g - (tl.sum(g, axis=1)[:, None] + s_hat * tl.sum(g * s_hat, axis=1)[:, None]) / C) * rstd[:, None]
            if HAS_H:   # the gradient of s from its other uses
                ds += tl.load(ds_ptr + at, mask=mask, other=0.0).to(tl.float32)
                tl.store(dh_ptr + at, ds.to(dh_ptr.dtype.element_ty), mask=mask)
            tl.store(dx_ptr + at, ds.to(dx_ptr.dtype.element_ty), mask=mask)
        at = tl.program_id(0) * 2 * C + offs_c
        tl.store(dwb_ptr + at, tl.sum(dw, axis=0), mask=col_ok)
        tl.store(dwb_ptr + at + C, tl.sum(db, axis=0), mask=col_ok)

    return locals()


def _require_triton() -> None:
    if not _HAS_TRITON:
        raise RuntimeError(f"backend 'triton' is not available; install it with: {_INSTALL_HINTS['triton']}")


@functools.cache
def _triton_kernels() -> types.SimpleNamespace:
    """Import triton and define the kernels (once), or raise saying how to install it. The definitions run with
    triton and tl in a globals dict of their own, where the interpreter also finds the helpers a kernel calls."""
    _require_triton()
    import triton, triton.language as tl
    scope = dict(globals(), triton=triton, tl=tl)
    kernels = types.FunctionType(_define_triton_kernels.__code__, scope)()
    scope.update(kernels)
    return types.SimpleNamespace(**{name.strip("_"): fn for name, fn in kernels.items()})


# --- Selective scan: custom ops and autograd
def _scan_fwd_outputs(u, A, Bs, Cs):   # also the fake of _selective_scan_fwd
    (Bsz, KD, L), K, N = u.shape, Bs.shape[1], A.shape[1]
    if KD % K != 0 or not tuple(Bs.shape) == tuple(Cs.shape) == (Bsz, K, N, L):
        raise ValueError(f"K*D={KD} must be a multiple of K={K}, and B and C (batch, K, N, L) = {(Bsz, K, N, L)}, "
                         f"got {list(Bs.shape)}, {list(Cs.shape)}")
    return u.new_empty((Bsz, KD, L), dtype=torch.float32), u.new_empty((Bsz, KD, N), dtype=torch.float32)


@torch.library.custom_op(f"{_OPS_NS}::selective_scan_fwd", mutates_args=())
def _selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, Bs: Tensor, Cs: Tensor, Ds: Optional[Tensor],
                        delta_bias: Optional[Tensor], delta_softplus: bool) -> Tuple[Tensor, Tensor]:
    """Returns y (B, K*D, L) and the last states (B, K*D, N), float32. An absent Ds/delta_bias gets a dummy."""
    (y, states), (Bsz, KD, L), K, N = _scan_fwd_outputs(u, A, Bs, Cs), u.shape, Bs.shape[1], A.shape[1]
    block_d, block_n, block_l = _scan_blocks(KD // K, N, L)
    _triton_kernels().scan_fwd_kernel[(Bsz * K, -(-KD // K // block_d))](
        *(t.contiguous() for t in (u, delta, A, Bs, Cs)),
        u if Ds is None else Ds.contiguous(), u if delta_bias is None else delta_bias.contiguous(), y, states,
        L, N, KD // K, K, -(-L // block_l), HAS_D=Ds is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l, num_warps=4)
    return y, states


_selective_scan_fwd.register_fake(lambda u, delta, A, Bs, Cs, *rest: _scan_fwd_outputs(u, A, Bs, Cs))


# --- Backend choice and the public kernels.
def _triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    return _HAS_TRITON and (device.type == "cuda"
                            or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"))


def available_backends(device: Union[str, torch.device] = "cuda") -> List[str]:
    """The selective-scan backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    names = ["mamba_ssm"] if device.type == "cuda" and _mamba_selective_scan_fn is not None else []
    return names + (["triton"] if _triton_usable(device) else []) + ["torch"]


def set_backend(name: Optional[str]) -> None:
    """Force the backend ``"auto"`` resolves to, process-wide (over ``VMAMBA_BACKEND``; layers decide again)."""
    global _forced_backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or None")
    _forced_backend = None if name == "auto" else name
    for layer in list(_LAYERS):
        layer._decide_path()


def _resolve_backend(backend: str, device: torch.device, ss2d: bool = False) -> str:
    """Turn a requested backend into the one that runs, or raise saying how to get it. ``"auto"`` on CUDA: the
    fastest of :func:`available_backends`; for SS2D (``ss2d``) Triton first, whose fused scans read the map in place
    (mamba_ssm's kernel needs the four copies of cross_scan, and cross_merge after it)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        backend = _forced_backend or os.environ.get("VMAMBA_BACKEND") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"VMAMBA_BACKEND={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        names = available_backends(device) if device.type == "cuda" else ["torch"]
        best = "triton" if ss2d and "triton" in names else names[0]
        if best == "torch" and device.type == "cuda":
            _warn_once("vmamba: CUDA tensors are using the pure-PyTorch selective scan, which is slow on GPU. "
                       f"For speed: {_INSTALL_HINTS['triton']}, or {_INSTALL_HINTS['mamba_ssm']}.")
        return best
    if backend == "mamba_ssm":
        if _mamba_selective_scan_fn is None:
            raise RuntimeError("backend 'mamba_ssm' is not available (its CUDA kernel did not import); "
                               f"install it with: {_INSTALL_HINTS['mamba_ssm']}")
        if device.type != "cuda":
            raise ValueError(f"backend 'mamba_ssm' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and not _triton_usable(device):   # kernels defined here would stay so (not interpreted)
        _require_triton()
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got tensors on {device}")
    return backend


def _check_scan_args(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                     z: Optional[Tensor], delta_bias: Optional[Tensor]) -> None:
    for name, t in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), (u, delta, A, B, C, D, z, delta_bias)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"selective_scan: {name} must be a Tensor, got {type(t).__name__}")
        if t is not None and not t.is_floating_point():  # integers would be truncated, imaginary parts dropped
            raise TypeError(f"selective_scan: {f'complex {name} is not supported; ' if t.is_complex() else ''}"
                            f"{name} must be a real floating-point tensor, got {t.dtype}")
    if u.ndim != 3 or delta.shape != u.shape or (z is not None and z.shape != u.shape):
        raise ValueError(f"selective_scan: u, delta (and z) must all be (B, G*D, L), got {tuple(u.shape)}, "
                         f"{tuple(delta.shape)}" + ("" if z is None else f" and {tuple(z.shape)}"))
    (batch, channels, length), n = u.shape, B.shape[-1] if B.ndim == 2 else B.shape[-2] if B.ndim > 2 else -1
    for name, t in (("B", B), ("C", C)):
        groups = 1 if t.ndim != 4 else t.shape[1]
        if t.shape != (channels, n) and (t.ndim not in (3, 4) or t.shape[0] != batch or t.shape[-2:] != (n, length)
                                         or groups < 1 or channels % groups):
            raise ValueError(f"selective_scan: B and C must both be (B, N, L) or (B, G, N, L) with B={batch}, "
                             f"L={length}, G >= 1 dividing G*D={channels} and one N, or mamba_ssm's constant "
                             f"(G*D, N) = ({channels}, N), got {tuple(B.shape)} and {tuple(C.shape)}")
    if A.shape != (channels, n):
        raise ValueError(f"selective_scan: A must be (G*D, N) = ({channels}, {n}), got {tuple(A.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (channels,):
            raise ValueError(f"selective_scan: {name} must be ({channels},), got {tuple(t.shape)}")


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, backend: str = "auto"):
    """mamba_ssm's ``selective_scan_fn``: same arguments, defaults and return convention. Shapes and recurrence
    as in :func:`selective_scan_ref`; B, C may be (B, N, L), (B, G, N, L) or constant (G*D, N). Computed in float32;
    returns y in u's dtype, or ``(y, last_state)`` (last_state (B, G*D, N) float32); differentiable in every tensor
    input. Finite wherever the float64 reference's states fit float32, growth (dt*A > 0) included, as long as no
    step after the first grows the state by more than float32's range (dt*A > 88); beyond, states overflow to inf.
    An empty dimension gives empty outputs (y the D term alone when N = 0); non-float inputs are a TypeError.
    ``backend``: ``"torch"`` (any device), ``"triton"`` (CUDA, no compiler), ``"mamba_ssm"`` (CUDA, compiled
    kernel) or ``"auto"`` (fastest on the inputs' device; see :func:`set_backend`)."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    backend = _resolve_backend(backend, u.device)
    (b, channels, L), n = u.shape, A.shape[1]
    if backend == "mamba_ssm" and 0 not in (b, channels, L, n):
        return _mamba_selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    B, C = (t.unsqueeze(1) if t.ndim == 3 else t for t in (B, C))    # (B, G, N, L) or constant (G*D, N)
    if B.ndim == 2 or C.ndim == 2 or B.shape[1] != C.shape[1]:  # as one group per channel, (B, G*D, N, L) each
        B, C = (t.float()[:, :, None].expand(b, -1, -1, L) if t.ndim == 2   # float32: their gradients summed unrounded
                else t.float().repeat_interleave(channels // t.shape[1], 1) for t in (B, C))
    if 0 in (b, channels, L, n):  # nothing to scan: zero states, y the D term alone, alike in every backend
        y, last = u.new_zeros(u.shape, dtype=torch.float32), u.new_zeros((b, channels, n), dtype=torch.float32)
        y = y if D is None else torch.addcmul(y, u.float(), D.float().unsqueeze(-1))
    elif backend == "triton":
        y, last = _selective_scan_fwd(u, delta, A, B, C, D, delta_bias, bool(delta_softplus))
    else:  # the torch scan runs channels-last: (B, G*D, L) -> (B, L, G, D), and back
        g, u32 = B.shape[1], u.float()   # u32: converted once
        dt = delta.float() if delta_bias is None else delta.float() + delta_bias.float().unsqueeze(-1)
        dt = (_softplus(dt) if delta_softplus else dt).reshape(b, g, -1, L).permute(0, 3, 1, 2).contiguous()
        y, last = _selective_scan_torch(u32.reshape(b, g, -1, L).permute(0, 3, 1, 2), dt, A.view(g, -1, n),
                                        B.permute(0, 3, 1, 2), C.permute(0, 3, 1, 2))   # (B, L, G, D) in and out
        y, last = y.permute(0, 2, 3, 1).flatten(1, 2), last.reshape(b, channels, n)     # (B, G*D, L) views
        y = y if D is None else torch.addcmul(y, u32, D.float().unsqueeze(-1))
    y = (y if z is None else y * F.silu(z.float())).to(u.dtype)
    return (y, last) if return_last_state else y


def _selective_scan_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])   # u, delta, A, Bs, Cs, Ds, delta_bias
    ctx.delta_softplus = inputs[7]
    ctx.mark_non_differentiable(output[1])


def _selective_scan_backward(ctx, dy, dstates):
    """Differentiates the torch scan of the same inputs (recomputed; float32 inside, as the kernel): the public
    Triton scan's backward. SS2D layers do not come here: their fused path has a backward kernel of its own."""
    inputs = [None if t is None else t.detach().requires_grad_() for t in ctx.saved_tensors]
    u, delta, A, Bs, Cs, Ds, delta_bias = inputs
    with torch.enable_grad():
        y = selective_scan(u.float(), delta, A, Bs, Cs, Ds, None, delta_bias, ctx.delta_softplus, backend="torch")
    grads = iter(torch.autograd.grad(y, [t for t in inputs if t is not None], dy))
    return (*(None if t is None else next(grads) for t in inputs), None)


_selective_scan_fwd.register_autograd(_selective_scan_backward, setup_context=_selective_scan_setup_context)


def _to_sequences(t: Tensor) -> Tensor:
    """(B, H, W, 4, X) -> (B, H*W, 4, X): direction k of t read in scan order k (row-major, column-major, both
    reversed); (B, H, W, X): the same map in all four. A copy with X contiguous, as the torch scan wants it."""
    r0, c1, r2, c3 = t.unbind(3) if t.dim() == 5 else (t,) * 4        # (B, H, W, X) each (unbind: no zero fills)
    return torch.stack([r0.flatten(1, 2), c1.transpose(1, 2).flatten(1, 2), r2.flatten(1, 2).flip(1),
                        c3.transpose(1, 2).flatten(1, 2).flip(1)], dim=2)            # (B, L, 4, X)


def _from_sequences(ys: Tensor, h: int, w: int) -> Tensor:
    """(B, H*W, 4, X) -> (B, H, W, X): the adjoint of :func:`_to_sequences` (sequences back on pixels, summed)."""
    y0, y1, y2, y3 = ys.unbind(2)                                     # (B, L, X) each
    rows, cols = y0 + y2.flip(1), y1 + y3.flip(1)
    return rows.unflatten(1, (h, w)) + cols.unflatten(1, (w, h)).transpose(1, 2)


def cross_scan(x: Tensor, backend: str = "auto") -> Tensor:
    """(B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, and both reversed (torch ops, any ``backend``)."""
    if x.ndim != 4:
        raise ValueError(f"cross_scan expects (B, C, H, W), got shape {tuple(x.shape)}")
    return _to_sequences(x.permute(0, 2, 3, 1)).permute(0, 2, 3, 1)


def cross_merge(ys: Tensor, backend: str = "auto") -> Tensor:
    """(B, 4, C, H, W) -> (B, C, H, W): the adjoint of :func:`cross_scan`. Sequence k of ``ys`` is in scan
    order (its H, W dims are only a shape); each is mapped back to its pixels and the four are summed."""
    if ys.ndim != 5 or ys.shape[1] != 4:
        raise ValueError(f"cross_merge expects (B, 4, C, H, W), got shape {tuple(ys.shape)}")
    return _from_sequences(ys.flatten(3).permute(0, 3, 1, 2), *ys.shape[3:]).permute(0, 3, 1, 2)


def _ss2d_tiles(x: Tensor, w_proj: Tensor, w_dt: Tensor, dt_bias: Tensor, A: Tensor, rows: int, cols: int) -> Tensor:
    """The torch scans of a large map in tiles, without autograd: direction k walks its own scan order in blocks of
    ``rows`` rows (k = 0, 2) or ``cols`` columns (k = 1, 3), backwards for k = 2, 3, each tile's scan starting from
    the previous one's last state; its outputs are added into the merged map, which this function allocates.
    x (B, H, W, D); w_proj (4, R + 2N, D); w_dt (4, D, R); dt_bias (4, D); A (4, D, N) -> merged (B, H, W, D) float32."""
    (b, h, w, d), n, r = x.shape, A.shape[2], w_dt.shape[2]
    merged = x.new_zeros((b, h, w, d), dtype=torch.float32)
    for k, step in enumerate((rows, cols, rows, cols)):
        src, dst = (x, merged) if k % 2 == 0 else (x.transpose(1, 2), merged.transpose(1, 2))   # (B, lines, len, D)
        state, starts = x.new_zeros((b, 1, n, d), dtype=torch.float32), range(0, src.shape[1], step)
        for s in starts if k < 2 else reversed(starts):
            seq = src[:, s:s + step].flatten(1, 2)                    # (B, l, D): the tile in scan order k
            seq = seq.flip(1) if k >= 2 else seq
            dts, Bs, Cs = torch.matmul(seq, w_proj[k].t()).float().split([r, n, n], dim=-1)   # (B, l, R|N|N)
            dt = _softplus(torch.addmm(dt_bias[k].float(), dts.flatten(0, 1), w_dt[k].float().t()))   # (B*l, D)
            y, state = _scan_chunks(seq.float().unsqueeze(2), dt.view(b, -1, 1, d), A[k:k + 1].transpose(1, 2),
                                    Bs.unsqueeze(2), Cs.unsqueeze(2), b, state, False)   # (B, l, 1, D), (B, 1, N, D)
            tile = dst[:, s:s + step]                                 # (B, lines of the tile, len, D)
            tile += (y.flip(1) if k >= 2 else y).view(tile.shape)
    return merged


# --- SS2D on the fused Triton kernels: the scan reads the map in place (and adds D*x), one kernel merges, normalises.
def _ss2d_blocks(D: int, N: int, R: int, backward: bool = False) -> Tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, BLOCK_R) of _ss2d_fwd_kernel (or _ss2d_bwd_kernel), a channel per thread (num_warps =
    BLOCK_D / 32). BLOCK_R = 0: dt from a GEMM (16 more bytes an element) above ranks 32 (16 at N > 4; 8 at N > 8 in
    the backward, which also holds w's gradient): w and dts would hold ~200 registers (255, spilling, backward)."""
    low = R <= (32 if N <= 4 else 16 if N <= 8 or not backward else 8)
    return 64 if D % 64 == 0 else 32, _next_pow2(N), _next_pow2(R) if low else 0


def _dt_gemm(dts: Tensor, w_dt: Tensor) -> Tensor:   # (B, H, W, 4, R), (4, D, R) -> dt (B, H, W, 4, D), contiguous
    return torch.einsum("bhwkr,kdr->bhwkd", dts, w_dt.to(dts.dtype)).contiguous()


_SS2D_SEGMENT = 32   # steps between the states the forward keeps for the backward: L/32 per (N, channel)
_BWD_MAXNREG = 255   # register caps: the backward scan's (the hardware's), the norm kernels' (4 warps, 4 blocks an
_NORM_MAXNREG = 128  # SM); without one ptxas may spill a few bytes to fit more blocks (the forward scan needs none)


def _ss2d_scan_outputs(x, proj, w_dt, bias, A_logs, Ds, save):   # ys and the states kept (empty unless save); fake
    (b, h, w, d), (block_d, block_n, _) = x.shape, _ss2d_blocks(x.shape[3], A_logs.shape[1], w_dt.shape[2])
    shape = (b * 4 * -(-d // block_d), -(-h * w // _SS2D_SEGMENT), block_n, block_d) if save else (0,)
    return x.new_empty((b, h, w, 4, d)), x.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op(f"{_OPS_NS}::ss2d_scan", mutates_args=())
def _ss2d_scan(x: Tensor, proj: Tensor, w_dt: Tensor, bias: Tensor, A_logs: Tensor, Ds: Tensor,
               save: bool) -> Tuple[Tensor, Tensor]:
    """x (B, H, W, D), proj (B, H, W, 4, R + 2N) (dts, B, C), and SS2D's w_dt (4, D, R), bias (4, D), A_logs (4*D, N),
    Ds (4*D,) as they are (read by the kernel in their dtype) -> ys (B, H, W, 4, D) in x's dtype: direction k's
    outputs, D term included, at the pixels they came from; with ``save`` every 32nd state, for the backward."""
    (b, h, w, d), r, n = x.shape, w_dt.shape[2], A_logs.shape[1]
    block_d, block_n, block_r = _ss2d_blocks(d, n, r)
    ys, ckpt = _ss2d_scan_outputs(x, proj, w_dt, bias, A_logs, Ds, save)
    dt = proj if block_r else _dt_gemm(proj[..., :r], w_dt)         # (B, H, W, 4, D)
    _triton_kernels().ss2d_fwd_kernel[(b * 4, -(-d // block_d))](
        x.contiguous(), proj.contiguous(), dt, w_dt.contiguous(), bias.contiguous(), A_logs.contiguous(),
        Ds.contiguous(), ys, ckpt if save else ys, h, w, d, r, n, LOW_RANK=block_r > 0, T=_SS2D_SEGMENT, SAVE=save,
        BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_R=max(block_r, 1), num_warps=block_d // 32)
    return ys, ckpt


_ss2d_scan.register_fake(_ss2d_scan_outputs)


@torch.library.custom_op(f"{_OPS_NS}::ss2d_scan_bwd", mutates_args=())
def _ss2d_scan_bwd(dys: Tensor, x: Tensor, proj: Tensor, w_dt: Tensor, bias: Tensor, A_logs: Tensor, Ds: Tensor,
                   ckpt: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of :func:`_ss2d_scan`'s inputs from dys (B, H, W, 4, D) and the states it kept (ckpt), by
    _ss2d_bwd_kernel; here, the sums of its partial results over channel blocks and samples (deterministic, no
    atomics), and for a GEMM'd dt its products with dts and w_dt."""
    (b, h, w, d), r, n = x.shape, w_dt.shape[2], A_logs.shape[1]
    (block_d, block_n, block_r), seg = _ss2d_blocks(d, n, r, backward=True), _SS2D_SEGMENT
    blocks, low, f32 = -(-d // block_d), block_r > 0, dict(device=x.device, dtype=torch.float32)
    dt = proj if low else _dt_gemm(proj[..., :r], w_dt)             # (B, H, W, 4, D)
    if dys.stride(-1) != 1 or dys.stride(0) != h * w * dys.stride(2) or dys.stride(1) != w * dys.stride(2):
        dys = dys.contiguous()   # else read in place: the merge's gradient has stride 0 over directions
    hs = torch.empty((b * 4 * blocks, seg, block_n, block_d), **f32)   # each program's scratch: a segment's states
    dxs, ddt = x.new_empty((b, h, w, 4, d)), x.new_empty((1,) if low else (b, h, w, 4, d))
    part = torch.empty((b, h, w, 4, blocks, (r if low else 0) + 2 * n), **f32)
    dw, dbias, dA, dDs = (torch.empty((b, 4, *shape), **f32) for shape in ((d, r if low else 1), (d,), (n, d), (d,)))
    _triton_kernels().ss2d_bwd_kernel[(b * 4, blocks)](
        x.contiguous(), proj.contiguous(), dt, w_dt.contiguous(), bias.contiguous(), A_logs.contiguous(),
        Ds.contiguous(), dys, ckpt.contiguous(), hs, dxs, part, ddt, dw, dbias, dA, dDs, h, w, d, dys.stride(2),
        dys.stride(3), r, n, LOW_RANK=low, T=seg, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_R=max(block_r, 1),
        num_warps=block_d // 32, maxnreg=_BWD_MAXNREG)
    dproj = part.sum(4)                                               # (B, H, W, 4, [R +] 2N)
    dw_dt = dw.sum(0) if low else torch.einsum("bhwkd,bhwkr->kdr", ddt, proj[..., :r])   # (4, D, R)
    if not low:   # the gradient of dts through the GEMM'd dt
        dproj = torch.cat([torch.einsum("bhwkd,kdr->bhwkr", ddt, w_dt.to(ddt.dtype)).float(), dproj], -1)
    return (dxs.sum(3), dproj.to(proj.dtype), dw_dt.to(w_dt.dtype).contiguous(), dbias.sum(0).to(bias.dtype),
            dA.sum(0).transpose(1, 2).reshape(4 * d, n).to(A_logs.dtype), dDs.sum(0).view(-1).to(Ds.dtype))


_ss2d_scan_bwd.register_fake(lambda dys, *inputs: tuple(t.new_empty(t.shape) for t in inputs[:6]))


def _saved(ctx, tensors, output, save, **info):   # for setup_context: tensors, the states or map kept (save), info
    ctx.save_for_backward(*tensors, output[1])
    ctx.saved, ctx.info, _ = save, info, ctx.mark_non_differentiable(output[1])


def _ss2d_scan_backward(ctx, dys, _):
    if not ctx.saved:   # no states were kept: nothing to start from
        raise RuntimeError("the fused SS2D scan's backward needs a forward with save=True")
    return *_ss2d_scan_bwd(dys, *ctx.saved_tensors), None


_ss2d_scan.register_autograd(_ss2d_scan_backward, setup_context=lambda ctx, inputs, output: _saved(
    ctx, inputs[:6], output, inputs[6]))


def _norm_blocks(c: int) -> Tuple[int, int]:   # (BLOCK_M, BLOCK_C) of the add_norm kernels: ~16 values a thread
    return max(1, 2048 // _next_pow2(c)), _next_pow2(c)


def _add_norm_outputs(x, h, weight, bias, eps, dtype):   # (s, n) as _add_norm returns them; also its fake
    s_dtype = x.dtype if h is None else torch.promote_types(x.dtype, h.dtype)   # that of x + h
    return x.new_empty(0 if h is None else x.shape, dtype=s_dtype), x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op(f"{_OPS_NS}::add_norm", mutates_args=())
def _add_norm(x: Tensor, h: Optional[Tensor], weight: Tensor, bias: Tensor, eps: float,
              dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(s, n): s = x + h in their promoted dtype and n = LayerNorm(s) over the last dim in ``dtype``, both contiguous
    (..., C); without h, n = LayerNorm(x) and s is empty."""
    (s, n), c = _add_norm_outputs(x, h, weight, bias, eps, dtype), x.shape[-1]
    block_m, block_c = _norm_blocks(c)
    _triton_kernels().add_norm_kernel[(-(-n.numel() // c // block_m),)](
        x.contiguous(), x if h is None else h.contiguous(), weight, bias, s, n, n.numel() // c, c, eps,
        HAS_H=h is not None, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4, maxnreg=_NORM_MAXNREG)
    return s, n


def _add_norm_grads(s, dn, ds, weight, eps, x_dtype, h_dtype):   # as _add_norm_bwd returns them; its fake
    return (s.new_empty(s.shape, dtype=x_dtype), s.new_empty(s.shape if h_dtype else 0, dtype=h_dtype or x_dtype),
            s.new_empty((2, s.shape[1]), dtype=torch.float32))


@torch.library.custom_op(f"{_OPS_NS}::add_norm_bwd", mutates_args=())
def _add_norm_bwd(s: Tensor, dn: Tensor, ds: Optional[Tensor], weight: Tensor, eps: float, x_dtype: torch.dtype,
                  h_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor]:
    """_add_norm's gradients from s (rows, C), the normalised input, in one kernel: dx, dh (empty without h), (dw, db)
    float32. Sums: of at most ~4096 programs' partial sums, added here (deterministic, unlike float atomics; a few
    rows of C against the map's millions)."""
    (rows, c), (block_m, block_c) = s.shape, _norm_blocks(s.shape[1])
    per_program = -(-rows // min(-(-rows // block_m), 4096) // block_m) * block_m   # rows, a multiple of block_m
    dx, dh, sums = _add_norm_grads(s, dn, ds, weight, eps, x_dtype, h_dtype)
    dwb = s.new_empty((-(-rows // per_program), *sums.shape), dtype=torch.float32)   # each program's dw, db
    _triton_kernels().add_norm_bwd_kernel[(len(dwb),)](
        s, dn.contiguous(), dn if ds is None else ds.contiguous(), weight, dx, dh if h_dtype else dx, dwb, rows, c,
        per_program, eps, HAS_H=ds is not None, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4, maxnreg=_NORM_MAXNREG)
    return dx, dh, dwb.sum(0)


_add_norm_bwd.register_fake(_add_norm_grads)


def _add_norm_setup_context(ctx, inputs, output):
    (x, h, weight, _, ctx.eps, _), ctx.shape = inputs, inputs[0].shape
    ctx.dtypes = x.dtype, None if h is None else h.dtype
    ctx.save_for_backward((x if h is None else output[0]).reshape(-1, x.shape[-1]).contiguous(), weight)


def _add_norm_backward(ctx, ds, dn):
    s, weight = ctx.saved_tensors                                     # the normalised input, (rows, C)
    has_h = ctx.dtypes[1] is not None
    dx, dh, dwb = _add_norm_bwd(s, dn, ds if has_h else None, weight, ctx.eps, *ctx.dtypes)
    dw, db = dwb.to(weight.dtype)
    return dx.view(ctx.shape), dh.view(ctx.shape) if has_h else None, dw, db, None, None


_add_norm.register_fake(_add_norm_outputs)
_add_norm.register_autograd(_add_norm_backward, setup_context=_add_norm_setup_context)


def _merge_norm_outputs(ys, z, weight, bias, eps, save):   # out and m (empty unless save); its fake
    (*pixels, _, d), rows = ys.shape, ys.numel() // ys.shape[-1] // 4
    return ys.new_empty((*pixels, d)), ys.new_empty((rows, d) if save else (0,), dtype=torch.float32)


@torch.library.custom_op(f"{_OPS_NS}::merge_norm", mutates_args=())
def _merge_norm(ys: Tensor, z: Optional[Tensor], weight: Tensor, bias: Tensor, eps: float,
                save: bool) -> Tuple[Tensor, Tensor]:
    """LayerNorm(m) * silu(z) (no z: no gate), m = ys.sum(3): ys (B, H, W, 4, D), z (B, H, W, D) -> ys's dtype;
    with ``save`` also m (rows, D) float32, for the backward (else empty)."""
    (out, m), d = _merge_norm_outputs(ys, z, weight, bias, eps, save), ys.shape[-1]
    zs = out if z is None else (z if z.stride(-1) == 1 else z.contiguous()).reshape(-1, d)   # rows zs.stride(0) apart
    rows, (block_m, block_d) = out.numel() // d, _norm_blocks(d)
    _triton_kernels().merge_norm_kernel[(-(-rows // block_m),)](
        ys.contiguous(), zs, weight, bias, out, m if save else out, rows, d, zs.stride(0), eps, HAS_Z=z is not None,
        SAVE=save, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4, maxnreg=_NORM_MAXNREG)
    return out, m


_merge_norm.register_fake(_merge_norm_outputs)


def _merge_norm_backward(ctx, g, _):
    """LayerNorm's backward on the m the forward kept, in the add_norm kernel; a gate's in torch ops (out = y *
    silu(z), y = norm(m) again; silu'(z) = s * (1 + z * (1 - s)))."""
    if not ctx.saved:
        raise RuntimeError("the fused merge's backward needs a forward with save=True")
    (z, weight, bias, m), eps, (ys_shape, ys_dtype) = ctx.saved_tensors, ctx.info["eps"], ctx.info["ys"]
    g, dz = g.reshape(m.shape), None
    if z is not None:
        y, zf = F.layer_norm(m, m.shape[-1:], weight.float(), bias.float(), eps), z.reshape(m.shape).float()
        s = torch.sigmoid(zf)
        g, dz = g * zf * s, (g * y * s * (1 + zf * (1 - s))).to(z.dtype).view(z.shape)
    dm, _, (dw, db) = _add_norm_bwd(m, g, None, weight, eps, ys_dtype, None)
    dys = dm.view(*ys_shape[:3], 1, ys_shape[4]).expand(ys_shape)   # the same gradient for every direction
    return dys, dz, dw.to(weight.dtype), db.to(bias.dtype), None, None


_merge_norm.register_autograd(_merge_norm_backward, setup_context=lambda ctx, inputs, output: _saved(
    ctx, inputs[1:4], output, inputs[5], eps=inputs[4], ys=(inputs[0].shape, inputs[0].dtype)))   # m, not ys


def _fused_norm(x: Tensor, norm: nn.LayerNorm, h: Optional[Tensor] = None, wide: bool = False) -> Tuple[Tensor, Tensor]:
    """(x + h, norm(x + h)) on the Triton kernels: the sum in the residual stream's dtype, the norm in what a Linear
    consumes: h's dtype, or without h autocast's dtype when it is on (``wide``: float32, for the residual stream),
    else x's."""
    on = torch.is_autocast_enabled(x.device.type)
    cast = torch.promote_types(x.dtype, torch.float32) if wide else torch.get_autocast_dtype(x.device.type)
    dtype = h.dtype if h is not None else cast if on else x.dtype
    return _add_norm(x, h, norm.weight, norm.bias, norm.eps, dtype)


def _ss2d_fused(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, dt_projs_bias: Tensor, A_logs: Tensor,
                Ds: Tensor, norm: Optional[nn.LayerNorm] = None, z: Optional[Tensor] = None) -> Tensor:
    """:func:`ss2d_core` on the fused kernels; with ``norm``, ``norm(core) * silu(z)`` (z optional) in the merge."""
    proj = torch.einsum("bhwd,kcd->bhwkc", x, x_proj_weight.to(x.dtype))   # (B, H, W, 4, R + 2N), per pixel
    save = torch.is_grad_enabled()   # keep what the backward starts from: the scans' states, the merged map
    ys = _ss2d_scan(x, proj, dt_projs_weight, dt_projs_bias, A_logs, Ds, save)[0]   # the weights as they are
    if norm is None:
        return ys.sum(3, dtype=torch.float32).to(x.dtype)
    return _merge_norm(ys, z, norm.weight, norm.bias, norm.eps, save)[0]   # (B, H, W, D)


def _ss2d_core(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, dt_projs_bias: Tensor,
               A_logs: Tensor, Ds: Tensor, backend: str, tile_rows: Optional[int] = None) -> Tensor:   # see ss2d_core
    (b, h, w, d), n, r = x.shape, A_logs.shape[1], dt_projs_weight.shape[2]
    backend = _resolve_backend(backend, x.device, ss2d=True)
    w_proj, w_dt = (t.to(x.dtype) for t in (x_proj_weight, dt_projs_weight))   # see below; the dt bias too
    A = -torch.exp(A_logs.float())                                    # (4*D, N)
    if backend == "torch" and _tile_rows(x, 4 * d, n, tile_rows):   # a large map, in inference: in tiles
        rows, cols = (_tile_rows(x, d, n, tile_rows, hw) or x.shape[hw[0]] for hw in ((1, 2), (2, 1)))
        merged = _ss2d_tiles(x, w_proj, w_dt, dt_projs_bias, A.view(4, d, n), rows, cols)
        return merged.addcmul_(x, Ds.float().view(4, d).sum(0)).to(x.dtype)   # the skip term, as below
    proj = _to_sequences(torch.einsum("bhwd,kcd->bhwkc", x, w_proj))  # per pixel, then (B, L, 4, R+2N)
    dts, Bs, Cs = proj.split([r, n, n], dim=-1)                       # (B, L, 4, R|N|N)
    if backend == "torch":  # in the scan's blocks of channels, so that a large map's temporaries stay small
        low, width, parts = dts.permute(2, 0, 1, 3).flatten(1, 2), _plan(b, h * w, 4, n, d)[1], []   # (4, B*L, R)
        for xc, wc, bc, Ac in zip(x.split(width, 3), w_dt.split(width, 1), dt_projs_bias.to(x.dtype).split(width, 1),
                                  A.view(4, d, n).split(width, 1)):   # (B, H, W, Dc), (4, Dc, R), (4, Dc), (4, Dc, N)
            dt = torch.bmm(low, wc.transpose(1, 2)) + bc.unsqueeze(1)   # (4, B*L, Dc); compiled, the bias fuses
            dt = _softplus(dt.float()).view(4, b, -1, xc.shape[3]).permute(1, 2, 0, 3)   # (B, L, 4, Dc)
            parts.append(_from_sequences(_selective_scan_torch(_to_sequences(xc), dt, Ac, Bs, Cs, False)[0], h, w))
        merged = parts[0] if len(parts) == 1 else torch.cat(parts, 3)   # (B, H, W, D)
    else:  # the kernels' layout (B, 4*D, L), made directly; the scan adds the bias and takes the softplus
        dts = torch.matmul(w_dt, dts.permute(0, 2, 3, 1)).flatten(1, 2)   # (4, D, R) @ (B, 4, R, L): (B, 4*D, L)
        ys = selective_scan(cross_scan(x.permute(0, 3, 1, 2), backend).flatten(1, 2), dts, A, Bs.permute(0, 2, 3, 1),
                            Cs.permute(0, 2, 3, 1), delta_bias=dt_projs_bias.float().flatten(), delta_softplus=True,
                            backend=backend)                          # (B, 4*D, L)
        merged = cross_merge(ys.view(b, 4, d, h, w), backend).permute(0, 2, 3, 1)   # (B, H, W, D)
    # The skip term D_k * u of every direction lands on the pixel it came from: sum_k D_k * x after the merge.
    return torch.addcmul(merged, x, Ds.float().view(4, d).sum(0)).to(x.dtype)   # (B, H, W, D)


# torch.compile traces the region once per input shape and reuses it in every block of that shape (old torch: no
# region; under inductor's freezing, weights are constants and each block has its own entry: no limit on entries).
# ss2d_core enters it only under dynamo without autograd: non-strict torch.export (its default) would compile it anew
# at every call, and torch 2.14 mislays strides when one backward region serves two blocks. Inside, weights are cast
# to x's dtype (torch 2.11 loses autocast there) and no float comes from a default (dynamic=True makes it symbolic).
try:
    _ss2d_core_region = torch.compiler.nested_compile_region(_ss2d_core, max_reuse_entries=1 << 16)
except (AttributeError, TypeError):  # torch without the region, or without its limit on entries
    _ss2d_core_region = getattr(torch.compiler, "nested_compile_region", lambda fn: fn)(_ss2d_core)


def ss2d_core(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, dt_projs_bias: Tensor,
              A_logs: Tensor, Ds: Tensor, backend: str = "auto", tile_rows: Optional[int] = None) -> Tensor:
    """SS2D's four-direction scan, ``cross_merge(selective_scan(cross_scan(x), ...))``: x (B, H, W, D); x_proj_weight
    (4, R + 2N, D); dt_projs_weight (4, D, R); dt_projs_bias (4, D); A_logs (4*D, N); Ds (4*D,) -> (B, H, W, D).
    Backend "torch" without autograd scans a large map in tiles of rows and columns (``tile_rows`` forces their size),
    each direction carrying its state from tile to tile: time and memory linear in the pixels."""
    if _resolve_backend(backend, x.device, ss2d=True) == "triton":
        return _ss2d_fused(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    core = _ss2d_core_region if torch.compiler.is_dynamo_compiling() and not torch.is_grad_enabled() else _ss2d_core
    return core(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, backend, tile_rows)


torch.fx.wrap("ss2d_core")   # FX's symbolic tracing records these as calls (shapes there are plans, not ops)
torch.fx.wrap("_ss2d_fused")
torch.fx.wrap("_fused_norm")


# --- Layers. Between VSSM's modules, maps are (B, C, H, W) in channels-last memory; each module views them as
# (B, H, W, C), so LayerNorm and Linear act on contiguous channels and permutes are free views (as in timm's
# ConvNeXt). "ln" and "ln2d" models have the same weights and function, so both run this one way.
def _one_of(name: str, value: Any, accepted: Sequence[Any]) -> Any:
    """Normalise a string option, or raise ValueError listing the accepted values."""
    key = value.lower() if isinstance(value, str) else value
    if key not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {list(accepted)}")
    return key


def _check_range(name: str, value: Any, low: float, high: float = math.inf, integer: bool = False,
                 low_open: bool = False) -> None:
    """Raise TypeError unless value is an int (or a float, unless ``integer``; a bool is neither), ValueError unless
    ``low <= value < high`` (``low < value`` with ``low_open``; NaN and inf fail)."""
    kind = "an integer" if integer else "a number"
    bounds = f"{'>' if low_open else '>='} {low}" + ("" if high == math.inf else f" and < {high}")
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TypeError(f"{name} must be {kind} {bounds}, got {value!r} ({type(value).__name__})")
    if not ((value > low if low_open else value >= low) and value < high):
        raise ValueError(f"{name} must be {kind} {bounds}, got {value!r}")


def _by_rows(fn: Callable[[Tensor], Tensor], x: Tensor, rows: int, dim: int, stride: int = 1, halo: int = 1) -> Tensor:
    """``fn(x)`` in bands of ``rows`` output rows along ``dim``, concatenated: for convolutions of total ``stride`` (and
    position-wise layers) whose output row i reads input rows in [(i - halo) * stride, (i + 1 + halo) * stride), or
    only up to (i + 1) * stride when strided. Each band reads its rows and those; the outputs of the ``halo`` rows
    above it (and below, at stride 1), which saw the band's edge as if it were the map's, are dropped."""
    size, out = x.shape[dim], []
    for o in range(0, -(-size // stride), rows):
        start, end = max(o - halo, 0) * stride, (o + rows + (halo if stride == 1 else 0)) * stride
        band = fn(x.narrow(dim, start, min(end, size) - start))
        skip = o - start // stride
        out.append(band.narrow(dim, skip, max(min(rows, band.shape[dim] - skip), 0)))
    return torch.cat(out, dim)


class Permute(nn.Module):
    """``x.permute(*dims)``; keeps the authors' Sequential indices in the state dict."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2, on the last dim."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1, self.act = nn.Linear(dim, hidden), nn.GELU()
        self.fc2, self.drop = nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


FORWARD_TYPES = ("v0", "v05", "v05_noz")


class _DecidesPath:
    """Modules that pick their kernels (``_path``; None: cannot run here) from ``backend``, set_backend and the device
    once: when built (setting ``backend``), moved (.to(), .cuda(), .half()), copied, unpickled, and on set_backend."""

    def _set_backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
        self._backend = name
        self._decide_path()

    backend = property(lambda self: self._backend, _set_backend)

    def _decide_path(self) -> None:
        _LAYERS.add(self)   # for set_backend
        try:
            self._path = _resolve_backend(self._backend, next(self.parameters()).device, ss2d=True)
        except (RuntimeError, ValueError):
            self._path = None

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> nn.Module:
        super()._apply(fn, *args, **kwargs)
        self._decide_path()
        return self

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._decide_path()


class LayerNorm(_DecidesPath, nn.LayerNorm):
    """nn.LayerNorm (same weights) of the stem's and downsampling's (B, H, W, C) maps. On the Triton path one kernel
    reads the convolution's output in its dtype and writes the norm in float32 under autocast (the residual stream),
    or with ``narrow`` in autocast's dtype (for the convolution or Linear that reads it)."""

    def __init__(self, dim: int, narrow: bool = False, backend: str = "auto"):
        super().__init__(dim)
        self.narrow, self.backend = narrow, backend

    def forward(self, x: Tensor) -> Tensor:
        return _fused_norm(x, self, wide=not self.narrow)[1] if self._path == "triton" else super().forward(x)


class SS2D(_DecidesPath, nn.Module):
    """2-D selective scan, VMamba's attention: (B, H, W, d_model) in and out, (B, d_model, H, W) with
    ``channel_first``. ``forward_type`` "v0"/"v05" gate the output with ``silu(z)`` from a second half of
    ``in_proj``; "v05_noz" does not. ``backend`` (default "auto"): its scan, decided when set, built or moved.
    ``tile_rows``: rows (and columns) per tile of a large map's scans in inference; None: planned from its shape."""

    def __init__(self, d_model: int = 96, d_state: int = 16, ssm_ratio: float = 2.0,
                 dt_rank: Union[int, str] = "auto", act_layer: str = "silu", d_conv: int = 3,
                 conv_bias: bool = True, dropout: float = 0.0, bias: bool = False,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, initialize: str = "v0",
                 forward_type: str = "v05_noz", channel_first: bool = False, tile_rows: Optional[int] = None):
        super().__init__()
        self.forward_type = _one_of("forward_type", forward_type, FORWARD_TYPES)
        for name, value, accepted in (("ssm_act_layer", act_layer, ("silu",)), ("dt_init", dt_init, ("random",)),
                                      ("ssm_init", initialize, ("v0",)), ("ssm_conv_bias", conv_bias, (False, True)),
                                      ("bias", bias, (False, True)), ("channel_first", channel_first, (False, True))):
            _one_of(name, value, accepted)
        for name, value in (("d_model", d_model), ("ssm_d_state", d_state), ("ssm_conv", d_conv)):
            _check_range(name, value, 1, integer=True)
        _check_range("ssm_ratio", ssm_ratio, 0, low_open=True)
        if d_conv % 2 == 0:
            raise ValueError(f"ssm_conv must be odd (a centred kernel keeps the map's size), got {d_conv}")
        if dt_rank != "auto":
            _check_range("ssm_dt_rank", dt_rank, 1, integer=True)
        _check_range("dt_min", dt_min, 0, low_open=True)   # log-uniform between dt_min and dt_max
        for args in (("ssm_drop_rate", dropout, 0, 1), ("dt_max", dt_max, dt_min), ("dt_scale", dt_scale, 0),
                     ("dt_init_floor", dt_init_floor, 0)):
            _check_range(*args)
        k, d_inner = 4, int(ssm_ratio * d_model)
        if d_inner < 1:
            raise ValueError(f"ssm_ratio * d_model must be >= 1, got {ssm_ratio} * {d_model}")
        rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.d_inner, self.d_state, self.dt_rank, self.channel_first = d_inner, d_state, rank, channel_first
        self.tile_rows = tile_rows
        self.gated = self.forward_type in ("v0", "v05")

        # Per-direction projections, stacked over the K=4 scan directions.
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * d_state, d_inner))
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        if self.forward_type != "v0":  # registration order follows the released state dicts
            self.out_norm = nn.LayerNorm(d_inner)
        self.in_proj = nn.Linear(d_model, d_inner * (2 if self.gated else 1), bias=bias)
        self.conv2d = (nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner,
                                 bias=conv_bias) if d_conv > 1 else None)
        if self.forward_type == "v0":
            self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self._dt_init = (dt_min, dt_max, dt_scale, dt_init_floor)
        self.reset_ssm_parameters()
        self.backend = "auto"

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Initialise the state-space parameters (kept apart from generic Linear init)."""
        dt_min, dt_max, dt_scale, floor = self._dt_init
        # x_proj: what nn.Linear(d_inner, R + 2N) would draw, for each direction.
        self.x_proj_weight.uniform_(-self.d_inner ** -0.5, self.d_inner ** -0.5)
        # dt_proj weight: keeps the variance of dt independent of the rank R.
        self.dt_projs_weight.uniform_(-self.dt_rank ** -0.5 * dt_scale, self.dt_rank ** -0.5 * dt_scale)
        # dt bias: inverse softplus of dt drawn log-uniformly in [dt_min, dt_max] (softplus(bias) starts there).
        dt = torch.exp(torch.rand_like(self.dt_projs_bias) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # A = -exp(A_logs) = -(1, 2, ..., N) per channel: the S4D-real initialisation, in float32.
        self.A_logs.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_logs))
        # D = 1: the skip connection starts as identity.
        self.Ds.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        if self.channel_first:
            x = x.permute(0, 2, 3, 1)                                 # (B, H, W, C)
        x = self.in_proj(x)                                           # (B, H, W, D or 2D)
        x, z = x.chunk(2, dim=-1) if self.gated else (x, None)        # (B, H, W, D) each
        if self.conv2d is not None:
            x = self.conv2d(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)   # (B, H, W, D)
        args = (F.silu(x), self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds)
        if self._path == "triton":  # out_norm and the gate in the merge kernel
            y = _ss2d_fused(*args, norm=self.out_norm, z=z)           # (B, H, W, D)
        else:
            y = self.out_norm(ss2d_core(*args, backend=self._path or self._backend,
                                            tile_rows=self.tile_rows))
            y = y if z is None else y * F.silu(z)
        out = self.dropout(self.out_proj(y))                          # (B, H, W, C)
        return out.permute(0, 3, 1, 2) if self.channel_first else out


class VSSBlock(nn.Module):
    """Pre-norm residual block: ``x + drop_path(SS2D(norm(x)))``, then an optional MLP. (B, H, W, hidden_dim) in
    and out, (B, C, H, W) with ``channel_first``. Keyword names follow the authors' code."""

    def __init__(self, hidden_dim: int = 96, drop_path: float = 0.0, channel_first: bool = False,
                 ssm_d_state: int = 16, ssm_ratio: float = 2.0, ssm_dt_rank: Union[int, str] = "auto",
                 ssm_act_layer: str = "silu", ssm_conv: int = 3, ssm_conv_bias: bool = True,
                 ssm_drop_rate: float = 0.0, ssm_init: str = "v0", forward_type: str = "v05_noz",
                 mlp_ratio: float = 4.0, mlp_act_layer: str = "gelu", mlp_drop_rate: float = 0.0,
                 gmlp: bool = False, post_norm: bool = False, tile_rows: Optional[int] = None):
        super().__init__()
        _one_of("mlp_act_layer", mlp_act_layer, ("gelu",))
        _one_of("gmlp", gmlp, (False,))
        _check_range("hidden_dim", hidden_dim, 1, integer=True)
        _one_of("channel_first", channel_first, (False, True))
        _one_of("post_norm", post_norm, (False, True))
        _check_range("mlp_ratio", mlp_ratio, 0)
        for name, value in (("mlp_drop_rate", mlp_drop_rate), ("drop_path", drop_path)):
            _check_range(name, value, 0, 1)
        self.channel_first, self.post_norm = channel_first, post_norm
        self.norm = nn.LayerNorm(hidden_dim)
        self.op = SS2D(d_model=hidden_dim, d_state=ssm_d_state, ssm_ratio=ssm_ratio, dt_rank=ssm_dt_rank,
                       act_layer=ssm_act_layer, d_conv=ssm_conv, conv_bias=ssm_conv_bias,
                       dropout=ssm_drop_rate, initialize=ssm_init, forward_type=forward_type, tile_rows=tile_rows)
        self.drop_path = DropPath(drop_path)
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(hidden_dim)
            self.mlp = Mlp(hidden_dim, int(hidden_dim * mlp_ratio), drop=mlp_drop_rate)
        else:
            self.norm2 = self.mlp = None

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training or self.post_norm) and isinstance(self.op, SS2D):   # a large map in inference: tiles
            widest = max(self.op.in_proj.out_features, 0 if self.mlp is None else self.mlp.fc1.out_features)
            rows = _tile_rows(x, widest, forced=self.op.tile_rows, hw=(2, 3) if self.channel_first else (1, 2))
            if rows is not None:
                return self._forward_tiles(x, rows)
        if isinstance(self.op, SS2D) and self.op._path == "triton" and self.mlp is not None and not self.post_norm:
            t = x.permute(0, 2, 3, 1) if self.channel_first else x   # (B, H, W, C); the norms in Triton kernels
            t, n = _fused_norm(t, self.norm2, self.drop_path(self.op(_fused_norm(t, self.norm)[1])))
            t = t + self.drop_path(self.mlp(n))
            return t.permute(0, 3, 1, 2) if self.channel_first else t
        # channel_first: branches on (B, H, W, C) views, sums on the maps (inductor lays out 4-D sums as NCHW ones)
        for norm, op in ((self.norm, self.op), (self.norm2, self.mlp)):
            if op is not None:
                h = x.permute(0, 2, 3, 1) if self.channel_first else x   # (B, H, W, C)
                h = norm(op(h)) if self.post_norm else op(norm(h))
                x = x + self.drop_path(h.permute(0, 3, 1, 2) if self.channel_first else h)
        return x

    def _forward_tiles(self, x: Tensor, rows: int) -> Tensor:
        """forward of a large map in inference (eval, pre-norm), in bands of rows: the scans' input silu(conv(in_proj(
        norm(x)))) with the convolution's halo rows, the scans in tiles, then per band the gate (z recomputed),
        out_proj, the residual and the MLP, written into the output, which this forward allocates."""
        op, d = self.op, self.op.d_inner
        x = x.permute(0, 2, 3, 1) if self.channel_first else x       # (B, H, W, C)
        weight, bias = op.in_proj.weight, op.in_proj.bias
        bias_x, bias_z = (None, None) if bias is None else (bias[:d], bias[d:])

        def scan_input(t: Tensor) -> Tensor:                          # (B, rows, W, C) -> (B, rows, W, D)
            t = F.linear(self.norm(t), weight[:d], bias_x)
            return F.silu(t if op.conv2d is None else op.conv2d(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        halo = 0 if op.conv2d is None else op.conv2d.padding[0]
        u = _by_rows(scan_input, x, _tile_rows(x, d, forced=op.tile_rows) or x.shape[1], 1, halo=halo)
        y = ss2d_core(u, op.x_proj_weight, op.dt_projs_weight, op.dt_projs_bias, op.A_logs, op.Ds, op.backend,
                      op.tile_rows)                                   # (B, H, W, D)
        del u
        out = torch.empty_like(x)                                     # (B, H, W, C), laid out as x
        for r in range(0, x.shape[1], rows):
            t, o = x[:, r:r + rows], op.out_norm(y[:, r:r + rows])   # (B, rows, W, C), (B, rows, W, D)
            o = o * F.silu(F.linear(self.norm(t), weight[d:], bias_z)) if op.gated else o
            t = t + op.out_proj(o)                                    # dropout and drop_path: identities in eval
            out[:, r:r + rows] = t if self.mlp is None else t + self.mlp(self.norm2(t))
        return out.permute(0, 3, 1, 2) if self.channel_first else out


class PatchMerging(nn.Module):
    """Downsample "v1": 2x2 neighbours concatenated, LayerNorm(4C), Linear(4C, 2C); NHWC (NCHW if channel_first)."""

    def __init__(self, dim: int, out_dim: int, channel_first: bool = False):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = LayerNorm(4 * dim, narrow=True)
        self.channel_first = channel_first

    def forward(self, x: Tensor) -> Tensor:
        if self.channel_first:
            x = x.permute(0, 2, 3, 1)                                 # (B, H, W, C)
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))                  # pad bottom row / right column
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2],
                       x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)    # (B, H/2, W/2, 4C)
        x = self.reduction(self.norm(x))                              # (B, H/2, W/2, 2C)
        return x.permute(0, 3, 1, 2) if self.channel_first else x


def _make_patch_embed(version: str, in_chans: int, dim: int, patch_size: int) -> nn.Sequential:
    """(B, in_chans, H, W) image -> (B, dim, H/patch, W/patch) map in channels-last memory."""
    if version == "v1":
        return nn.Sequential(nn.Conv2d(in_chans, dim, patch_size, stride=patch_size),
                             Permute(0, 2, 3, 1), LayerNorm(dim), Permute(0, 3, 1, 2))
    stride = patch_size // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, 3, stride=stride, padding=1), Permute(0, 2, 3, 1), LayerNorm(dim // 2, True),
        Permute(0, 3, 1, 2), nn.GELU(), nn.Conv2d(dim // 2, dim, 3, stride=stride, padding=1), Permute(0, 2, 3, 1),
        LayerNorm(dim), Permute(0, 3, 1, 2))


def _make_downsample(version: str, dim: int, out_dim: int) -> nn.Module:
    """(B, dim, H, W) -> (B, out_dim, ceil(H/2), ceil(W/2)), channels-last memory in and out."""
    if version == "v1":
        return PatchMerging(dim, out_dim, channel_first=True)
    conv = nn.Conv2d(dim, out_dim, 2, stride=2) if version == "v2" else nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
    # Index 0 is the authors' Permute (channels-last models) or Identity (channels-first ones).
    return nn.Sequential(nn.Identity(), conv, Permute(0, 2, 3, 1), LayerNorm(out_dim), Permute(0, 3, 1, 2))


class ClassifierHead(nn.Module):
    """LayerNorm, global average pool, Linear on a (B, H, W, C) map; ``global_pool=""``: the (B, C, H, W) map (timm)."""

    def __init__(self, dim: int, num_classes: int, global_pool: str = "avg"):
        super().__init__()
        self.global_pool = _one_of("global_pool", global_pool, ("avg", ""))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.norm(x)                                              # (B, H, W, C)
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))                                    # (B, C)
            return x if pre_logits else self.head(x)
        return (x if pre_logits else self.head(x)).permute(0, 3, 1, 2)   # (B, C, H, W)


# --- Checkpoints: reading files safely, downloading once, converting any released layout.
class PickledObject:
    """Inert stand-in for an object that a released training checkpoint stores beside its weights (an argparse
    namespace, a numpy scalar or array, an mmengine log buffer): it keeps what the file gives it, ``args`` (of the
    call that would have built it) and ``state`` (what ``__setstate__`` would have got), and runs nothing."""
    global_name = ""   # the qualified name the checkpoint gives, set per stand-in class

    def __new__(cls, *args: Any) -> "PickledObject":   # torch's loader calls cls(*args) or cls.__new__(cls, *args)
        self = super().__new__(cls)
        self.args, self.state = args, None
        return self

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:   # short: args and state may hold large arrays
        return f"<PickledObject {self.global_name}>"


def _stand_in(global_name: str) -> type:
    return type(global_name.rpartition(".")[2], (PickledObject,), {"global_name": global_name})


# The globals beyond torch's allowlist that the released checkpoints hold, and what each is read as: the training
# config (yacs), argparse namespaces, numpy scalars and arrays (numpy 1 and 2 names) and mmengine's log buffers (in
# detection and segmentation checkpoints). A yacs CfgNode is a dict whose items arrive by SETITEMS, which torch's
# loader allows only into dicts: it is read as an OrderedDict, its attributes (BUILD) in the OrderedDict's __dict__.
_CHECKPOINT_GLOBALS: Dict[str, type] = {"yacs.config.CfgNode": OrderedDict, **{name: _stand_in(name) for name in (
    "argparse.Namespace", "numpy.dtype", "numpy.ndarray", "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar", "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "mmengine.logging.history_buffer.HistoryBuffer")}}


def _checkpoint_format(path: str) -> str:
    """"zip" (torch.save), "safetensors" or "legacy" (torch.save's old format) for a file that looks complete in that
    format (a zip archive that opens; a safetensors header that parses and accounts for every byte); else ValueError
    saying what the file is."""
    with open(path, "rb") as file:
        head, size = file.read(64), os.fstat(file.fileno()).st_size
        length = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and length <= min(size - 8, 100_000_000):
            file.seek(8)
            with contextlib.suppress(ValueError, TypeError, LookupError, AttributeError, RecursionError):
                header = json.loads(file.read(length))
                ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
                if max(ends, default=0) == size - 8 - length:
                    return "safetensors"
            raise ValueError("a safetensors file whose header does not parse or match its size (incomplete?)")
    if head.startswith(b"PK\x03\x04"):
        try:
            zipfile.ZipFile(path).close()   # reads the central directory, which sits at the very end
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise ValueError(f"a zip archive that does not open, likely incomplete ({err})") from None
        return "zip"
    if head.startswith(b"\x80\x02\x8a\x0a"):   # the pickled magic number of torch.save's legacy format
        return "legacy"
    if re.match(rb"\s*<(!doctype html|html|head|body)\b", head, re.IGNORECASE):
        raise ValueError("an HTML page, not a checkpoint")
    raise ValueError(f"not a checkpoint: not torch.save's zip or legacy format, not safetensors (starts {head[:16]!r})")


def _safetensors(purpose: str) -> Any:
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError(f"{purpose} needs the safetensors package: pip install safetensors") from err
    return safetensors.torch


def load_checkpoint_file(path: Union[str, os.PathLike]) -> Any:
    """Load a checkpoint onto the CPU without running code from it: safetensors files with safetensors, others with
    ``torch.load(weights_only=True)``. Of the globals torch does not allow, only those the released checkpoints hold
    are read (a yacs config as an OrderedDict, the others as :class:`PickledObject`); a file naming any other is
    refused before it is unpickled. Raises OSError as ``open``, ImportError (with the pip command) for safetensors
    without the package, ValueError for a file that is not read (saying why)."""
    source = os.fspath(path)
    open(source, "rb").close()   # OSError as open() gives it: missing file, a folder, no permission
    try:
        kind = _checkpoint_format(source)
        if kind == "safetensors":
            return _safetensors(f"{source} is a safetensors file, which").load_file(source, device="cpu")
        # A zip's globals are listed without unpickling it; the legacy format's are not, so all known ones are allowed.
        found = torch.serialization.get_unsafe_globals_in_checkpoint(source) if kind == "zip" else _CHECKPOINT_GLOBALS
        unknown = sorted(set(found) - set(_CHECKPOINT_GLOBALS))
        if unknown:
            raise ValueError(
                f"it names {', '.join(unknown)}, which torch.load(weights_only=True) does not allow and released "
                "VMamba checkpoints do not hold, so it was not unpickled. If you trust the file, load it with "
                "torch.load(path, weights_only=False) (this runs code the file contains) and pass the result to "
                "load_pretrained")
        with torch.serialization.safe_globals([(_CHECKPOINT_GLOBALS[name], name) for name in found]):
            return torch.load(source, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as err:
        if not isinstance(err, pickle.UnpicklingError):
            plain = isinstance(err, ValueError) and err.__cause__ is None   # our own words, or torch's
            reason = str(err) if plain else f"{type(err).__name__}: {err}"
            raise ValueError(f"{source} could not be read as a PyTorch checkpoint: {reason}") from err
        # torch's message suggests weights_only=False, which a file of unknown origin must not get: its core only.
        text = str(err)
        core = text.partition("WeightsUnpickler error:")[2].strip() or text.split("\n\n")[int("\n\n" in text)]
        reason = f"torch.load(weights_only=True) refused it: {core.strip().splitlines()[0]}"
        if kind == "legacy":
            reason += ("; a file in torch.save's legacy non-zip format (_use_new_zipfile_serialization=False) "
                       "cannot be checked before it is unpickled, so what it names is not listed")
    raise ValueError(f"{source} could not be read as a PyTorch checkpoint: {reason}")


_RELEASES = "https://github.com/MzeroMiko/VMamba/releases/download/"


def _cache_file_name(url: str) -> str:
    """The file name a download of ``url`` is cached under. A release file keeps torch.hub's name (the URL's last
    path segment), so torch.hub, timm and this file share it; any other URL gets that segment made filesystem-safe
    plus a hash of the URL, so that two URLs (another host, another query) never share a file."""
    parts = urllib.parse.urlsplit(url)
    segment = parts.path.rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", urllib.parse.unquote(segment, errors="replace")).lstrip(".")
    if not name:
        raise ValueError(f"cannot derive a cache file name from URL {url!r}")
    if url.startswith(_RELEASES) and name == segment and not parts.query and not parts.fragment:
        return name
    ext = (re.search(r"\.[A-Za-z0-9]{1,16}$", name) or re.search("$", name)).group()   # ".pth", or none
    url_hash = hashlib.sha256(urllib.parse.urldefrag(url)[0].encode()).hexdigest()[:12]
    return f"{name[:len(name) - len(ext)][:160]}-{url_hash}{ext}"


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _temporary_beside(path: str) -> str:
    """A fresh hidden name in ``path``'s folder, so that the finished file is renamed (atomically) over ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.urandom(6).hex()}.partial")


def _fetch(url: str, file: Any, progress: bool, timeout: float) -> None:
    """Write the body of an http(s) GET of ``url`` to ``file``; EOFError if fewer bytes came than announced."""
    request = urllib.request.Request(url, headers={"User-Agent": "vmamba.py"})
    with urllib.request.urlopen(request, timeout=timeout) as response:   # the timeout bounds connect and each read
        if response.headers.get_content_type() == "text/html":
            raise ValueError("the server returned an HTML page, not a checkpoint")
        announced = response.headers.get("Content-Length", "")
        total = int(announced) if announced.isdigit() else None
        bar, received = None, 0
        if progress and importlib.util.find_spec("tqdm") is not None:   # as torch.hub's bar
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024)
        try:
            while chunk := response.read(1 << 16):
                file.write(chunk)
                received += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    if total is not None and received != total:
        raise EOFError(f"{received} of the {total} bytes announced arrived: the connection closed early")


def download_cached(url: str, sha256: Optional[str] = None, progress: bool = True,
                    cache_dir: Union[str, os.PathLike, None] = None, timeout: float = 30.0) -> str:
    """Download an http(s) ``url`` once to ``cache_dir`` (default ``<torch.hub.get_dir()>/checkpoints``) and return
    the path. A file reaches the cache only complete and checked: as many bytes as announced, a zip archive that opens
    or a safetensors header that parses, ``sha256`` (hex digest or >= 8-digit prefix) when given; it is written to a
    temporary name and renamed. A cached file is checked the same way on every call and downloaded again if it fails.
    ``timeout`` (seconds) bounds the connection and every read. A failed download raises RuntimeError (ValueError
    for a SHA-256 mismatch) naming the URL and the cache file to create offline, and removes only its own file."""
    if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        raise ValueError(f"only http(s) URLs can be downloaded, got {url!r}")
    expected = None if sha256 is None else sha256.strip().lower()
    if expected is not None and not re.fullmatch(r"[0-9a-f]{8,64}", expected):
        raise ValueError(f"sha256 must be a SHA-256 hex digest or a prefix of at least 8 hex digits, got {sha256!r}")
    cache_dir = os.fspath(os.path.join(torch.hub.get_dir(), "checkpoints") if cache_dir is None else cache_dir)
    name = _cache_file_name(url)
    dest = os.path.join(cache_dir, name)
    if os.path.isfile(dest):
        try:
            _checkpoint_format(dest)
            if expected is None or (actual := _file_sha256(dest)).startswith(expected):
                return dest
            problem = f"has SHA-256 {actual}, expected {expected}"
        except ValueError as err:   # e.g. a cut-off file that another downloader left
            problem = f"is {err}"
        warnings.warn(f"Cached file {dest} {problem}; downloading {url} again", stacklevel=2)
    os.makedirs(cache_dir, exist_ok=True)
    partial = _temporary_beside(dest)
    try:
        with open(partial, "xb") as file:
            _fetch(url, file, progress, timeout)
        try:
            _checkpoint_format(partial)
        except ValueError as err:
            raise ValueError(f"the server returned {err}") from None
        actual = None if expected is None else _file_sha256(partial)
        if actual is None or actual.startswith(expected):
            os.replace(partial, dest)
            return dest
    except Exception as err:
        raise RuntimeError(f"Failed to download {url}: {err}. Offline, save the file as {name} in {cache_dir} "
                           f"(that is, {dest}), or pass a local path to load_pretrained or pretrained=") from err
    finally:
        with contextlib.suppress(OSError):   # only this call's own file; gone already once renamed
            os.remove(partial)
    raise ValueError(f"SHA-256 mismatch for {url}: expected {expected}, got {actual}; the download was deleted")


_WRAPPER_KEYS = ("model", "state_dict", "model_ema")   # the first one present is used
_PREFIXES = ("module.", "backbone.")
# The February 2024 layout of the vanilla models -> ours.
_RENAMES = tuple((re.compile(p), r) for p, r in (
    (r"^patch_embed\.proj\.", "patch_embed.0."), (r"^patch_embed\.norm\.", "patch_embed.2."), (r"\.ln_1\.", ".norm."),
    (r"\.self_attention\.", ".op."), (r"^norm\.", "classifier.norm."), (r"^head\.", "classifier.head.")))
# The authors' newer single-file layout: unstacked projections -> stacked parameters.
_UNSTACKED = {"op.x_proj.weight": "op.x_proj_weight", "op.dt_projs.weight": "op.dt_projs_weight",
              "op.dt_projs.bias": "op.dt_projs_bias"}
_MERGING = re.compile(r"^(layers\.\d+\.downsample)\.([12])\.(weight|bias)$")
_FIRST_CONV = "patch_embed.0.weight"


def _unwrap_checkpoint(ckpt: Any) -> Dict[str, Tensor]:
    while isinstance(ckpt, dict):
        inner = next((ckpt[k] for k in _WRAPPER_KEYS if isinstance(ckpt.get(k), dict)), None)
        if inner is None:
            break
        ckpt = inner
    if not isinstance(ckpt, dict) or not any(isinstance(v, Tensor) for v in ckpt.values()):
        raise ValueError("no state dict found: expected a dict of tensors, or one inside a "
                         f"{'/'.join(repr(k) for k in _WRAPPER_KEYS)} entry; got {type(ckpt).__name__}"
                         + (f" with keys {', '.join(map(repr, list(ckpt)[:8]))}" if isinstance(ckpt, dict) else ""))
    for key in ckpt:
        if not isinstance(key, str):
            raise ValueError(f"the state dict has a key {key!r} of type {type(key).__name__}; keys are strings")
    return {k: v for k, v in ckpt.items() if isinstance(v, Tensor)}


def _tensor_problem(value: Tensor) -> Optional[str]:
    """Why ``value`` cannot be copied into a parameter, or None: it must be dense, hold data, and be floating point."""
    if value.is_meta:
        return "a tensor on the meta device (no data)"
    if value.layout != torch.strided or value.is_nested:
        return f"a {'nested' if value.is_nested else value.layout} tensor, not a dense one"
    if value.is_quantized:
        return f"a quantized tensor ({value.dtype})"
    return None if value.is_floating_point() else f"a {value.dtype} tensor, not floating point"


def _adapt_input_conv(weight: Tensor, in_chans: int) -> Tensor:
    """An RGB first-conv weight (O, 3, k, k) adapted to ``in_chans`` as timm does (sum, or repeat and rescale)."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def checkpoint_filter_fn(checkpoint: Any, model: nn.Module) -> Dict[str, Tensor]:
    """Convert any known checkpoint layout to ``model``'s state-dict layout: the released one, the authors' newer
    single-file one (unstacked ``x_proj``/``dt_projs``, ``downsample.1/.2``), the February 2024 one (``ln_1``,
    ``self_attention``, top-level ``norm``/``head``), ``module.``/``backbone.`` prefixes and ``model``/``state_dict``/
    ``model_ema`` wrappers. Drops the head when the model has none; adapts an RGB first conv to ``in_chans``. Pure;
    unknown keys are passed through (``load_pretrained`` reports them). ValueError for a key that is not a string
    and for two keys that give the same key (e.g. ``x`` and ``module.x``: two weight sets in one dict)."""
    state = _unwrap_checkpoint(checkpoint)
    if any(k.startswith("backbone.") for k in state):   # detection/segmentation: keep the backbone
        state = {k: v for k, v in state.items() if k.startswith("backbone.")}
    own, out, origin = model.state_dict(), {}, {}
    for original, value in state.items():
        key = original
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        for old, new in _UNSTACKED.items():
            key = key[: -len(old)] + new if key.endswith(old) else key
        merging = _MERGING.match(key)
        if merging and merging.group(1) + ".norm.weight" in own:
            part = "norm" if merging.group(2) == "1" else "reduction"
            key = f"{merging.group(1)}.{part}.{merging.group(3)}"
        if key in origin:
            raise ValueError(f"keys {origin[key]!r} and {original!r} both give {key!r}: the checkpoint holds two "
                             "weight sets; pass the state dict of the one to load")
        origin[key] = original
        target = own.get(key)
        if target is not None and _tensor_problem(value) is None:
            # The newer layout's unstacked (K*a, b) projections are our stacked (K, a, b): that reshape only.
            if key.rsplit(".", 1)[-1] in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias") and target.ndim >= 2 \
                    and value.shape == (target.shape[0] * target.shape[1], *target.shape[2:]):
                value = value.reshape(target.shape)
            if (key == _FIRST_CONV and value.ndim == 4 and value.shape[1] == 3 and target.shape[1] != 3
                    and value.shape[2:] == target.shape[2:]):
                value = _adapt_input_conv(value, target.shape[1])
        out[key] = value
    if "classifier.head.weight" not in own:  # no head (num_classes=0) or no classifier at all
        out = {k: v for k, v in out.items() if not k.startswith("classifier.head.")}
    if not hasattr(model, "classifier"):
        out = {k: v for k, v in out.items() if not k.startswith("classifier.")}
    return out


def _is_url(source: Any) -> bool:
    return isinstance(source, str) and source.split("://", 1)[0].lower() in ("http", "https")


def _checked_state(model: nn.Module, checkpoint: Any, strict: bool, name: str) -> Dict[str, Tensor]:
    """The part of ``checkpoint`` to copy into ``model``, every tensor checked first (a dense floating-point tensor of
    the parameter's shape); ValueError naming the key otherwise. Writes nothing."""
    try:
        state = checkpoint_filter_fn(checkpoint, model)
    except ValueError as err:
        raise ValueError(f"cannot load {name} into {type(model).__name__}: {err}.") from None
    own, tolerated, head = model.state_dict(), set(), "classifier.head.weight"
    if (head in own and head in state and state[head].ndim == 2
            and state[head].shape[0] != own[head].shape[0] and state[head].shape[1] == own[head].shape[1]):
        warnings.warn(f"vmamba: the checkpoint's head has {state[head].shape[0]} classes and the model "
                      f"{own[head].shape[0]}: classifier.head is left freshly initialised.", stacklevel=3)
        state = {k: v for k, v in state.items() if not k.startswith("classifier.head.")}
        tolerated |= {k for k in own if k.startswith("classifier.head.")}
    if not any(k.startswith("outnorm") for k in state):
        tolerated |= {k for k in own if k.startswith("outnorm")}
    for key, value in state.items():
        if key in own and (problem := _tensor_problem(value)):
            raise ValueError(f"cannot load {name} into {type(model).__name__}: {key} is {problem}.")
    missing = [k for k in own if k not in state and k not in tolerated]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        report = (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mis-shaped "
                  f"of {len(own)} model keys")
        examples = "; ".join(f"{label} e.g. {items[:3]}" for label, items in (
            ("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)) if items)
        if strict:
            raise ValueError(f"cannot load {name} into {type(model).__name__} ({report}): {examples}. "
                             "Is it a checkpoint of another architecture?")
        warnings.warn(f"vmamba: partial load of {name} ({report}): {examples}", stacklevel=3)
        state = {k: v for k, v in state.items() if k in own and state[k].shape == own[k].shape}
    return state


def load_pretrained(model: nn.Module, source: Any, strict: bool = True, sha256: Optional[str] = None,
                    progress: bool = True, timeout: float = 30.0) -> nn.Module:
    """Load weights into ``model`` from a path (PyTorch or ``.safetensors``), an http(s) URL or a state dict.
    URLs are downloaded once into torch.hub's cache (:func:`download_cached`: ``sha256``, ``progress``, ``timeout``);
    any layout of :func:`checkpoint_filter_fn`; files are read without running code. ``strict``: every parameter
    must load with the right shape, except a head of another class count (left fresh, with a warning) and a
    backbone's ``outnorm`` layers. One transaction: every tensor is checked before the first is written, and on any
    error (a ValueError naming the key for a checkpoint that does not fit) the model is unchanged. Returns ``model``."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        path = download_cached(source, sha256, progress, timeout=timeout) if _is_url(source) else source
        checkpoint = load_checkpoint_file(path)
    elif isinstance(source, dict):
        checkpoint = source
    else:
        raise TypeError(f"source must be a path, an http(s) URL or a state dict, got {type(source).__name__}")
    name = source if isinstance(source, str) else "the given state dict"
    try:
        state = _checked_state(model, checkpoint, strict, name)
    except ValueError as err:
        raise ValueError(f"{err} The model is unchanged.") from None
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    return model


# --- The model: VSSM (classification) and Backbone_VSSM (detection, segmentation), built of the layers.
def _reject_unknown(cls: type, unknown: Dict[str, Any]) -> None:
    """TypeError for keywords that ``cls`` does not take, naming the closest accepted one (``drop_path`` ->
    ``drop_path_rate``)."""
    if not unknown:
        return
    accepted = [p for c in cls.__mro__ if "__init__" in vars(c) for p in inspect.signature(c.__init__).parameters]
    key = next(iter(unknown))
    close = difflib.get_close_matches(key, [p for p in accepted if p not in ("self", "kwargs", "unknown")], n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"see help(vmamba.{cls.__name__}) for the accepted ones"
    raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {key!r}: {hint}")


class VSSM(nn.Module):
    """VMamba classifier; keyword names are the authors', so their configs work. Defaults build VMamba-T (s1l8).

    ``forward_type`` "v0" | "v05" | "v05_noz"; ``patchembed_version`` "v1" | "v2"; ``downsample_version`` "v1" |
    "v2" | "v3"; ``norm_layer`` "ln" | "ln2d" (same weights and outputs); ``global_pool`` "avg" | "" (output: the
    normalised map). ``dims``: the first stage's width (doubled per stage) or one per stage. ``device``, ``dtype``:
    PyTorch's factory keywords (timm passes them). Input: float (B, in_chans, H, W) in the model's dtype (or any
    under autocast); output: (B, num_classes). Every argument is checked here: TypeError for a wrong type, ValueError
    for a wrong value, and at most 1024 blocks and about 2**33 weights.
    In inference (no autograd, eval), a large map goes through the stem, the blocks and the downsampling in bands of
    rows and through the scans in tiles (the same values, time and memory linear in the pixels); ``tile_rows``
    forces the rows (and columns) per tile, else each map's shape decides (maps that fit run untiled)."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 depths: Sequence[int] = (2, 2, 8, 2), dims: Union[int, Sequence[int]] = 96, ssm_d_state: int = 1,
                 ssm_ratio: float = 1.0, ssm_dt_rank: Union[int, str] = "auto", ssm_act_layer: str = "silu",
                 ssm_conv: int = 3, ssm_conv_bias: bool = False, ssm_drop_rate: float = 0.0, ssm_init: str = "v0",
                 forward_type: str = "v05_noz", mlp_ratio: float = 4.0, mlp_act_layer: str = "gelu",
                 mlp_drop_rate: float = 0.0, gmlp: bool = False, drop_path_rate: float = 0.2, patch_norm: bool = True,
                 norm_layer: str = "ln2d", downsample_version: str = "v3", patchembed_version: str = "v2",
                 use_checkpoint: bool = False, posembed: bool = False, imgsize: int = 224, check_finite: bool = False,
                 global_pool: str = "avg", device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None, tile_rows: Optional[int] = None, **unknown: Any):
        super().__init__()
        _reject_unknown(type(self), unknown)
        self.norm_layer = _one_of("norm_layer", norm_layer, ("ln", "ln2d"))
        patchembed_version = _one_of("patchembed_version", patchembed_version, ("v1", "v2"))
        downsample_version = _one_of("downsample_version", downsample_version, ("v1", "v2", "v3"))
        _one_of("forward_type", forward_type, FORWARD_TYPES)
        _one_of("patch_norm", patch_norm, (True,))
        _one_of("posembed", posembed, (False,))
        _check_range("patch_size", patch_size, 1, integer=True)
        if patchembed_version == "v2" and patch_size % 2:
            raise ValueError(f"patch_size must be even for patchembed_version 'v2', got {patch_size}")
        _check_range("in_chans", in_chans, 1, integer=True)
        _check_range("num_classes", num_classes, 0, integer=True)
        _check_range("drop_path_rate", drop_path_rate, 0, 1)
        _check_range("imgsize", imgsize, 1, integer=True)
        for name, value in (("use_checkpoint", use_checkpoint), ("check_finite", check_finite)):
            _one_of(name, value, (False, True))
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        if isinstance(depths, str) or not isinstance(depths, Sequence):
            raise TypeError(f"depths must be a sequence of block counts, one per stage, got {depths!r}")
        if isinstance(dims, (str, bool)) or not isinstance(dims, (int, Sequence)):
            raise TypeError(f"dims must be an integer (the first stage's width) or one per stage, got {dims!r}")
        dims = [dims * 2 ** i for i in range(len(depths))] if isinstance(dims, int) else list(dims)
        if len(dims) != len(depths) or not depths:
            raise ValueError(f"dims and depths must have one entry per stage, got dims={dims}, depths={list(depths)}")
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            _check_range(f"dims[{i}]", dim, 2 if patchembed_version == "v2" and i == 0 else 1, integer=True)
            _check_range(f"depths[{i}]", depth, 1, integer=True)
        _check_range("ssm_ratio", ssm_ratio, 0, low_open=True)
        _check_range("mlp_ratio", mlp_ratio, 0)
        # A typo such as depths=[10**7, 2, 8, 2] would build until memory runs out: bound the model's size first.
        weights = sum(d * c * c * (3 * ssm_ratio + 2 * mlp_ratio + 1) for c, d in zip(dims, depths))   # the Linears
        weights += dims[-1] * num_classes
        if sum(depths) > 1024 or weights > 2 ** 33:
            raise ValueError(f"depths={list(depths)} with dims={dims} give {sum(depths)} blocks and about {weights:.2g}"
                             " weights; at most 1024 blocks and 2**33 weights (32 GiB in float32) are accepted")
        self.in_chans, self.patch_size, self.num_classes = in_chans, patch_size, num_classes
        self.depths, self.dims, self.num_features, self.head_hidden_size = list(depths), dims, dims[-1], dims[-1]
        self.check_finite, self.grad_checkpointing, self.tile_rows = check_finite, use_checkpoint, tile_rows
        if tile_rows is not None:
            _check_range("tile_rows", tile_rows, 1, integer=True)
        # The stem's stride, and the output rows by which its bands overlap: its reach (v2: two 3x3 convolutions), at
        # least one (so that a band never ends with less than a stride of rows)
        s = patch_size // 2
        self._stem_rows = (patch_size, 1) if patchembed_version == "v1" else (s * s, -(-(s + 1) // (s * s)))
        # A stage's map before its downsample: the output of its last block, (B, C, H, W).
        self.feature_info = [dict(num_chs=d, reduction=patch_size * 2 ** i, module=f"layers.{i}.blocks")
                             for i, d in enumerate(dims)]
        rates = [drop_path_rate * j / max(sum(depths) - 1, 1) for j in range(sum(depths))]   # rises linearly
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.patch_embed = _make_patch_embed(patchembed_version, in_chans, dims[0], patch_size)
            self.layers = nn.ModuleList()
            for i, depth in enumerate(depths):
                blocks = nn.Sequential(*[VSSBlock(
                    dims[i], drop_path=rates[sum(depths[:i]) + j], channel_first=True, ssm_d_state=ssm_d_state,
                    ssm_ratio=ssm_ratio, ssm_dt_rank=ssm_dt_rank, ssm_act_layer=ssm_act_layer, ssm_conv=ssm_conv,
                    ssm_conv_bias=ssm_conv_bias, ssm_drop_rate=ssm_drop_rate, ssm_init=ssm_init,
                    forward_type=forward_type, mlp_ratio=mlp_ratio, mlp_act_layer=mlp_act_layer,
                    mlp_drop_rate=mlp_drop_rate, gmlp=gmlp, tile_rows=tile_rows) for j in range(depth)])
                downsample = (_make_downsample(downsample_version, dims[i], dims[i + 1]) if i + 1 < len(depths)
                              else nn.Identity())
                self.layers.append(nn.Sequential(OrderedDict(blocks=blocks, downsample=downsample)))
            self.classifier = ClassifierHead(dims[-1], num_classes, global_pool)
        self.apply(self._init_weights)
        if dtype is not None:
            self.to(dtype=dtype)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Generic layers only: SS2D's own parameters are set in SS2D.reset_ssm_parameters.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            m.reset_parameters()   # weight 1, bias 0

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass: same results, much less memory."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names to exclude from weight decay: the SSM's A, D and dt biases."""
        return {name for name, _ in self.named_parameters()
                if name.rsplit(".", 1)[-1] in ("A_logs", "Ds", "dt_projs_bias")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups by depth, in timm's format (its ``layer_decay`` uses them): the stem, then each stage
        (``coarse``) or each block, a stage's downsample after its blocks; the classifier last."""
        return dict(stem=r"^patch_embed", blocks=r"^layers\.(\d+)" if coarse else [
            (r"^layers\.(\d+)\.blocks\.(\d+)", None), (r"^layers\.(\d+)\.downsample", (1 << 16,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head by a freshly initialised one with ``num_classes`` outputs (0: none).
        ``global_pool``: "avg", or "" to return the normalised (B, C, H, W) map; None keeps it."""
        _check_range("num_classes", num_classes, 0, integer=True)
        if global_pool is not None:
            self.classifier.global_pool = _one_of("global_pool", global_pool, ("avg", ""))
        self.num_classes = num_classes
        like = next(self.parameters())   # the new head joins the model's device, dtype and mode
        head = (nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype)
                if num_classes > 0 else nn.Identity())
        head.apply(self._init_weights)
        self.classifier.head = head.train(self.training)

    def _check_input(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):  # symbolic tracing: nothing to check yet
            return x
        expected = f"a float tensor of shape (B, {self.in_chans}, H, W)"
        if not isinstance(x, Tensor):
            raise TypeError(f"expected {expected}, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"expected {expected}, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            hint = " (channels-last input? use x.permute(0, 3, 1, 2))" if x.shape[3] == self.in_chans else ""
            raise ValueError(f"expected {expected}, got {x.shape[1]} channels in shape {tuple(x.shape)}{hint}")
        if not x.is_floating_point():
            raise TypeError(f"expected {expected}, got dtype {x.dtype}; convert with x.float() "
                            "(and normalise as in training)")
        like = self.patch_embed[0].weight.dtype   # dtypes are static: compiled and exported graphs keep the check
        if x.dtype != like and not torch.is_autocast_enabled(x.device.type):   # autocast casts for each op
            raise TypeError(f"got a {x.dtype} image for a {like} model: cast the image with x.to({like}) or the model "
                            f"with model.to({x.dtype}), or use torch.autocast")
        # operator.index keeps H, W static under torch.compile (a graph per size; symbolic ones compile ~7x slower)
        if x.shape[0] == 0 or min(operator.index(x.shape[2]), operator.index(x.shape[3])) < self.patch_size:
            raise ValueError(f"expected {expected} with batch >= 1 and H, W >= {self.patch_size}, "
                             f"got shape {tuple(x.shape)}")
        if self.check_finite and not torch.compiler.is_compiling() and not torch.isfinite(x).all():
            raise ValueError("input contains NaN or Inf values")  # opt-in, eager only
        return x

    def _banded(self, module: nn.Module, x: Tensor, out_dim: int, stride: int, halo: int = 1) -> Tensor:
        """``module(x)`` on a (B, C, H, W) map: the stem or a downsampling, in bands of output rows when large."""
        rows = _tile_rows(x, 2 * out_dim, forced=self.tile_rows, hw=(2, 3), stride=stride)   # ~ its input
        return module(x) if rows is None else _by_rows(module, x, rows, 2, stride, halo)

    def _embed(self, x: Tensor) -> Tensor:
        return self._banded(self.patch_embed, self._check_input(x), self.dims[0], *self._stem_rows)

    def _downsample(self, i: int, x: Tensor) -> Tensor:
        module = self.layers[i].downsample
        return x if isinstance(module, nn.Identity) else self._banded(module, x, self.dims[i + 1], 2)

    def _stage(self, i: int, x: Tensor) -> Tensor:
        """Blocks of stage i on a (B, C, H, W) map (before its downsample)."""
        blocks = self.layers[i].blocks
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return blocks(x)   # one call: hooks on layers.{i}.blocks (feature_info) see the stage map
        for block in blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return x

    def _stage_indices(self, indices: Optional[Union[int, Sequence[int]]]) -> List[int]:
        """Stage numbers from timm's ``indices``: None (all), n (the last n) or stage numbers (< 0: from the end)."""
        n, is_int = len(self.layers), lambda i: isinstance(i, int) and not isinstance(i, bool)
        if indices is None:
            indices = list(range(n))
        elif is_int(indices):
            if not 1 <= indices <= n:
                raise ValueError(f"indices={indices} asks for the last {indices} stages; expected 1 to {n}")
            indices = list(range(n - indices, n))
        if isinstance(indices, str) or not isinstance(indices, Sequence) or not all(map(is_int, indices)):
            raise TypeError(f"indices must be None, an int or a sequence of stage numbers, got {indices!r}")
        indices = [i % n if -n <= i < n else i for i in indices]
        if not indices or any(not 0 <= i < n for i in indices):
            raise ValueError(f"indices must be stage numbers in [0, {n}), got {indices}")
        return indices

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Stage outputs (before downsampling) as a list, and the final features. ``indices``: stage indices, or an
        int n for the last n (default: all); ``norm``: the classifier's LayerNorm on the last stage's map;
        ``output_fmt`` "NCHW" | "NHWC". Returns ``intermediates`` if ``intermediates_only``, else (final, them)."""
        fmt, n = _one_of("output_fmt", output_fmt, ("nchw", "nhwc")), len(self.layers)
        indices = self._stage_indices(indices)
        last = max(indices) if (stop_early or intermediates_only) else n - 1
        x, intermediates = self._embed(x), []                         # (B, C0, H/4, W/4)
        for i in range(last + 1):
            x = self._stage(i, x)                                     # (B, C_i, H_i, W_i)
            if i in indices:
                o = x.permute(0, 2, 3, 1)                             # (B, H_i, W_i, C_i)
                o = self.classifier.norm(o) if (norm and i == n - 1) else o
                intermediates.append(o.permute(0, 3, 1, 2) if fmt == "nchw" else o)
            x = self._downsample(i, x)
        return intermediates if intermediates_only else ((x if fmt == "nchw" else x.permute(0, 2, 3, 1)), intermediates)

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop what feature extraction at stages ``indices`` never uses (timm's API): later stages and the last
        one's downsample; the classifier's Linear with ``prune_head``, its LayerNorm with ``prune_norm``. Afterwards
        the model is only for :meth:`forward_intermediates`. Returns the indices as stage numbers."""
        indices = self._stage_indices(indices)
        last, self.layers = max(indices), self.layers[:max(indices) + 1]
        self.layers[last].downsample = nn.Identity()
        if hasattr(self, "classifier"):  # Backbone_VSSM has none
            if prune_head:
                self.reset_classifier(0)
            if prune_norm or last < len(self.dims) - 1:
                self.classifier.norm = nn.Identity()
        return indices

    def forward_features(self, x: Tensor) -> Tensor:
        """Final stage's map, (B, num_features, H/32, W/32), before the classifier's norm."""
        x = self._embed(x)                                            # (B, C0, H/4, W/4)
        for i in range(len(self.layers)):
            x = self._downsample(i, self._stage(i, x))
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, C, H, W) features -> logits, or pooled features with ``pre_logits``."""
        return self.classifier(x.permute(0, 2, 3, 1), pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def flops(self, shape: Sequence[int] = (3, 224, 224)) -> float:
        """FLOPs of one input of ``shape`` (C, H, W) as the authors' ``VSSM.flops`` counts them: multiply-adds (about
        4.9e9 for VMamba-T at 224 px). Dense operations via ``torch.utils.flop_counter`` (its count / 2); each
        selective scan (length L, D channels over all four directions, state N) adds 9*L*D*N, the Mamba authors'
        estimate; norms and element-wise ops are not counted. Runs on meta-device stand-ins; the model is unchanged."""
        from torch.utils.flop_counter import FlopCounterMode
        scans = []

        def count_scan(module: SS2D, args: Tuple[Tensor]) -> None:
            x = args[0]                                               # (B, H, W, C) or (B, C, H, W)
            h, w = x.shape[2:] if module.channel_first else x.shape[1:3]
            scans.append(9 * x.shape[0] * h * w * 4 * module.d_inner * module.d_state)
        hooks = [m.register_forward_pre_hook(count_scan) for m in self.modules() if isinstance(m, SS2D)]
        tensors = {name: torch.empty_like(t, device="meta")
                   for name, t in list(self.named_parameters()) + list(self.named_buffers())}
        try:
            with (counter := FlopCounterMode(display=False)):
                torch.func.functional_call(self, tensors, (torch.empty(1, *shape, device="meta"),))
        finally:
            for hook in hooks:
                hook.remove()
        return counter.get_total_flops() / 2 + sum(scans)

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load a downloaded checkpoint file (timm's hook for ``pretrained=True``): the module's
        :func:`load_pretrained`, but a head of another class count is replaced silently, as timm does."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="vmamba: the checkpoint's head")
            load_pretrained(self, checkpoint_path)  # the module function


class Backbone_VSSM(VSSM):
    """VMamba backbone for detection and segmentation (the authors' ``Backbone_VSSM``): a list of NCHW maps, one
    per stage in ``out_indices`` (strides 4..32), each through its LayerNorm ``outnorm{i}``. ``pretrained``: a path,
    URL or state dict to load (a classification checkpoint works: its head is ignored).

    OpenMMLab's backbone keywords: ``frozen_stages`` (-1: none; 0: the stem; k: the stem and stages 0..k-1, with
    their downsampling and output norms) takes those parameters out of training and keeps them in eval mode;
    ``norm_eval`` is accepted for configs written for BatchNorm backbones (LayerNorm has no running statistics, so
    it changes nothing); ``init_cfg=dict(type="Pretrained", checkpoint=...)`` is loaded by :meth:`init_weights`,
    which OpenMMLab's runners call after building the model."""

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), pretrained: Any = None,
                 norm_layer: str = "ln", frozen_stages: int = -1, norm_eval: bool = False,
                 init_cfg: Optional[Dict[str, Any]] = None, **kwargs: Any):
        if (isinstance(out_indices, str) or not isinstance(out_indices, Sequence)
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in out_indices)):
            raise TypeError(f"out_indices must be a sequence of stage numbers, got {out_indices!r}")
        super().__init__(norm_layer=norm_layer, **dict(kwargs, num_classes=0))
        n = len(self.layers)
        if not out_indices or any(not 0 <= i < n for i in out_indices):
            raise ValueError(f"out_indices must be non-empty stage numbers in [0, {n}), got {list(out_indices)}")
        _check_range("frozen_stages", frozen_stages, -1, n + 1, integer=True)
        _one_of("norm_eval", norm_eval, (False, True))
        if init_cfg is not None and (not isinstance(init_cfg, dict) or init_cfg.get("type") != "Pretrained"
                                     or not init_cfg.get("checkpoint")):
            raise ValueError(f"init_cfg must be dict(type='Pretrained', checkpoint=PATH_OR_URL), got {init_cfg!r}")
        self.out_indices, self.frozen_stages, self.norm_eval = sorted(set(out_indices)), frozen_stages, norm_eval
        self.init_cfg = init_cfg
        del self.classifier
        like = self.patch_embed[0].weight
        for i in self.out_indices:
            self.add_module(f"outnorm{i}", nn.LayerNorm(self.dims[i], device=like.device, dtype=like.dtype))
        self.feature_info = [self.feature_info[i] for i in self.out_indices]
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)
        if pretrained:
            load_pretrained(self, pretrained)

    def _frozen_modules(self) -> List[nn.Module]:
        stages = range(self.frozen_stages)
        return ([self.patch_embed] if self.frozen_stages >= 0 else []) + [self.layers[i] for i in stages] + [
            getattr(self, f"outnorm{i}") for i in stages if i in self.out_indices]

    def train(self, mode: bool = True) -> "Backbone_VSSM":
        """nn.Module.train, except that frozen stages stay in eval mode (no drop path)."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def init_weights(self) -> None:
        """Load ``init_cfg``'s checkpoint, if one was given (OpenMMLab calls this once the model is built)."""
        if self.init_cfg is not None:
            load_pretrained(self, self.init_cfg["checkpoint"])

    def forward(self, x: Tensor) -> List[Tensor]:
        x, outs = self._embed(x), []                                  # (B, C0, H/4, W/4)
        for i in range(self.out_indices[-1] + 1):
            x = self._stage(i, x)                                     # (B, C_i, H_i, W_i)
            if i in self.out_indices:
                out = getattr(self, f"outnorm{i}")(x.permute(0, 2, 3, 1))
                outs.append(out.permute(0, 3, 1, 2).contiguous())    # (B, C_i, H_i, W_i)
            x = self._downsample(i, x)
        return outs

    def forward_features(self, x: Tensor) -> Tensor:
        raise TypeError("Backbone_VSSM has no classifier: call the backbone itself for its feature maps")

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        raise TypeError("Backbone_VSSM has no classifier head")


# --- Saving: what load_checkpoint_file reads back.
def save_weights(state_dict_or_model: Union[nn.Module, Dict[str, Any]], path: Union[str, os.PathLike]) -> None:
    """Save a state dict, or a module's, to ``path``: with torch.save, or as safetensors when the name ends in
    .safetensors (tensors only; written contiguous, on the CPU, tensors sharing storage as separate copies). The file
    is written under a temporary name in the same folder and renamed over ``path``: never left half written."""
    state = state_dict_or_model.state_dict() if isinstance(state_dict_or_model, nn.Module) else state_dict_or_model
    path = os.fspath(path)
    tensors, storages = {}, set()
    if path.endswith(".safetensors"):
        save_file = _safetensors("writing a .safetensors file").save_file
        for key, value in state.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"{key!r} is a {type(value).__name__}; a .safetensors file holds only tensors")
            value = value.detach().cpu().contiguous()
            storage = value.untyped_storage().data_ptr()
            tensors[key] = value.clone() if storage in storages else value
            storages.add(storage)
    partial = _temporary_beside(path)
    try:
        if path.endswith(".safetensors"):
            save_file(tensors, partial, metadata={"format": "pt"})
        else:
            torch.save(state, partial)
        os.replace(partial, path)
    finally:
        with contextlib.suppress(OSError):   # gone already once renamed
            os.remove(partial)


# --- The model zoo: the nine ImageNet-1K models released by the authors.
_VANILLA = dict(ssm_d_state=16, ssm_ratio=2.0, ssm_conv_bias=True, forward_type="v0", mlp_ratio=0.0,
                downsample_version="v1", patchembed_version="v1", norm_layer="ln")
_V2 = dict(ssm_d_state=1, ssm_conv_bias=False, forward_type="v05_noz", mlp_ratio=4.0,
           downsample_version="v3", patchembed_version="v2", norm_layer="ln2d")

# name: (architecture, checkpoint, params, GFLOPs at 224 px, ImageNet-1K top-1)
_ZOO: Dict[str, Tuple[Dict[str, Any], str, int, float, float]] = {
    "vanilla_vmamba_tiny": (dict(_VANILLA, depths=[2, 2, 9, 2], dims=96, drop_path_rate=0.2),
                            "%23v0cls/vssmtiny_dp01_ckpt_epoch_292.pth", 22893448, 5.6, 82.2),
    "vanilla_vmamba_small": (dict(_VANILLA, depths=[2, 2, 27, 2], dims=96, drop_path_rate=0.3),
                             "%23v0cls/vssmsmall_dp03_ckpt_epoch_238.pth", 44417416, 11.2, 83.5),
    "vanilla_vmamba_base": (dict(_VANILLA, depths=[2, 2, 27, 2], dims=128, drop_path_rate=0.6),
                            "%23v0cls/vssmbase_dp06_ckpt_epoch_241.pth", 76254056, 18.0, 83.7),
    "vmamba_tiny_s2l5": (dict(_V2, depths=[2, 2, 5, 2], dims=96, ssm_ratio=2.0, drop_path_rate=0.2),
                         "%23v2cls/vssm_tiny_0230_ckpt_epoch_262.pth", 30705832, 4.9, 82.5),
    "vmamba_small_s2l15": (dict(_V2, depths=[2, 2, 15, 2], dims=96, ssm_ratio=2.0, drop_path_rate=0.3),
                           "%23v2cls/vssm_small_0229_ckpt_epoch_222.pth", 50147752, 8.7, 83.6),
    "vmamba_base_s2l15": (dict(_V2, depths=[2, 2, 15, 2], dims=128, ssm_ratio=2.0, drop_path_rate=0.6),
                          "%23v2cls/vssm_base_0229_ckpt_epoch_237.pth", 88557800, 15.4, 83.9),
    "vmamba_tiny_s1l8": (dict(_V2, depths=[2, 2, 8, 2], dims=96, ssm_ratio=1.0, drop_path_rate=0.2),
                         "%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth", 30249064, 4.9, 82.6),
    "vmamba_small_s1l20": (dict(_V2, depths=[2, 2, 20, 2], dims=96, ssm_ratio=1.0, drop_path_rate=0.3),
                           "%23v2cls/vssm1_small_0229s_ckpt_epoch_240.pth", 49012840, 8.6, 83.3),
    "vmamba_base_s1l20": (dict(_V2, depths=[2, 2, 20, 2], dims=128, ssm_ratio=1.0, drop_path_rate=0.5),
                          "%23v2cls/vssm1_base_0229s_ckpt_epoch_225.pth", 86614504, 15.2, 83.8),
}
# Evaluation transform of every released model.
EVAL_CONFIG = dict(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic",
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def list_models() -> List[str]:
    """Names of the released models, accepted by :func:`create_model`."""
    return list(_ZOO)


def model_config(name: str) -> Dict[str, Any]:
    """Constructor keywords of a released model (a fresh dict: safe to modify)."""
    if name not in _ZOO:
        raise ValueError(f"unknown model {name!r}; expected one of {list_models()}")
    return {k: (list(v) if isinstance(v, list) else v) for k, v in _ZOO[name][0].items()}


def pretrained_url(name: str) -> str:
    """Download URL of a released model's checkpoint."""
    model_config(name)
    return _RELEASES + _ZOO[name][1]


def _build(name: str, pretrained: Union[bool, str, dict], **kwargs: Any) -> VSSM:
    """``VSSM(**config, **kwargs)`` (or ``Backbone_VSSM`` with ``features_only=True``)."""
    model_args = model_config(name)
    features_only = kwargs.pop("features_only", False)
    if features_only:
        model_args["norm_layer"] = "ln"  # a backbone's layout; weights are the same
    model = (Backbone_VSSM if features_only else VSSM)(**dict(model_args, **kwargs))
    if pretrained:
        load_pretrained(model, pretrained_url(name) if pretrained is True else pretrained)
    return model


def _zoo_function(name: str, label: str) -> Callable[..., VSSM]:
    """The public builder of a released model, e.g. ``vmamba_tiny_s1l8(pretrained=False, **kwargs)``."""
    def builder(pretrained: Union[bool, str] = False, **kwargs: Any) -> VSSM:
        return _build(name, pretrained, **kwargs)
    params, gflops, top1 = _ZOO[name][2:]
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"{label}: {params / 1e6:.1f}M params, {gflops} GFLOPs, {top1}% top-1."
    return builder


vanilla_vmamba_tiny = _zoo_function("vanilla_vmamba_tiny", "VMamba-T, vanilla (v0, N=16, no MLP)")
vanilla_vmamba_small = _zoo_function("vanilla_vmamba_small", "VMamba-S, vanilla (v0, N=16, no MLP)")
vanilla_vmamba_base = _zoo_function("vanilla_vmamba_base", "VMamba-B, vanilla (v0, N=16, no MLP)")
vmamba_tiny_s2l5 = _zoo_function("vmamba_tiny_s2l5", "VMamba-T (ssm_ratio 2, depth 5 in stage 3)")
vmamba_small_s2l15 = _zoo_function("vmamba_small_s2l15", "VMamba-S (ssm_ratio 2, depth 15 in stage 3)")
vmamba_base_s2l15 = _zoo_function("vmamba_base_s2l15", "VMamba-B (ssm_ratio 2, depth 15 in stage 3)")
vmamba_tiny_s1l8 = _zoo_function("vmamba_tiny_s1l8", "VMamba-T (ssm_ratio 1, depth 8 in stage 3)")
vmamba_small_s1l20 = _zoo_function("vmamba_small_s1l20", "VMamba-S (ssm_ratio 1, depth 20 in stage 3)")
vmamba_base_s1l20 = _zoo_function("vmamba_base_s1l20", "VMamba-B (ssm_ratio 1, depth 20 in stage 3)")


def create_model(name: str, pretrained: Union[bool, str] = False, **kwargs: Any) -> VSSM:
    """Build a released model by name; ``pretrained`` is False, True (the released
    weights) or a path/URL. Every keyword reaches the model (``num_classes=10`` works;
    ``features_only=True, out_indices=(1, 2, 3)`` gives a :class:`Backbone_VSSM`)."""
    model_config(name)
    return globals()[name](pretrained=pretrained, **kwargs)


# --- Ecosystem: timm's registry and OpenMMLab's. Neither package is imported unless asked for.
# timm's weights-only loader refuses the released files (training state): ``custom_load`` uses VSSM.load_pretrained,
# and the entry point downloads the file itself (download_cached) into the cache file timm would use.
default_cfgs: Dict[str, Dict[str, Any]] = {name: dict(
    url=pretrained_url(name), custom_load=True, num_classes=1000, pool_size=(7, 7), first_conv="patch_embed.0",
    classifier="classifier.head", license="mit", paper_ids="arXiv:2401.10166",
    origin_url="https://github.com/MzeroMiko/VMamba", **EVAL_CONFIG) for name in _ZOO}


def _timm_entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        from timm.models import build_model_with_cfg
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        if pretrained and not (overlay.get("file") or overlay.get("state_dict")
                               or isinstance(kwargs.get("pretrained_cfg"), dict)):   # a whole cfg: timm's way
            # timm's own download fails offline with an error naming no URL: download_cached names it and the file
            overlay["file"] = download_cached(overlay.get("url", default_cfgs[name]["url"]),
                                              cache_dir=kwargs.get("cache_dir"))
        return build_model_with_cfg(VSSM, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                    feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
                                    pretrained_cfg_overlay=overlay or None, **dict(model_config(name), **kwargs))
    entrypoint.__name__ = entrypoint.__qualname__ = name   # timm registers it under this name
    entrypoint.__doc__ = f"timm entry point of {name}; its configuration is default_cfgs[{name!r}]."
    return entrypoint


def register_timm() -> List[str]:
    """Register the zoo with timm (``timm.create_model("vmamba_tiny_s1l8", pretrained=True)``, ``features_only``,
    ``feature_cls="fx"``) and SS2D, PatchMerging, DropPath as FX leaves. Done on ``import vmamba`` when timm is
    imported; idempotent; another module's names are left alone. Returns the names registered."""
    from timm.layers import register_notrace_module
    from timm.models import is_model, model_entrypoint, register_model
    for module in (SS2D, PatchMerging, DropPath):
        register_notrace_module(module)
    registered = []
    for name in _ZOO:
        if is_model(name) and model_entrypoint(name).__module__ != __name__:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # timm warns when it replaces a registration
            register_model(_timm_entrypoint(name))
        registered.append(name)
    return registered


def register_mm() -> type:
    """Register :class:`Backbone_VSSM` as ``"MM_VSSM"`` (the authors' name) in the MODELS registries of
    mmengine and, when installed, mmdet and mmseg, so the authors' configs build it. Done on ``import vmamba``
    when mmengine is imported (as a config's ``custom_imports`` does); idempotent."""
    if importlib.util.find_spec("mmengine") is None:
        raise ImportError("register_mm needs OpenMMLab's mmengine (and mmdet or mmseg for their pipelines): "
                          "pip install -U openmim && mim install mmengine mmdet mmsegmentation")
    for package in ("mmengine", "mmdet", "mmseg"):
        with contextlib.suppress(ImportError):
            importlib.import_module(f"{package}.registry").MODELS.register_module(
                name="MM_VSSM", module=Backbone_VSSM, force=True)
    return Backbone_VSSM


def _register_with_imported_packages() -> None:
    """Imported after timm or mmengine (e.g. by an OpenMMLab config's ``custom_imports``): register with them."""
    for package, register in (("timm", register_timm), ("mmengine", register_mm)):
        if package in sys.modules:
            try:
                register()
            except Exception as e:  # e.g. an old version without these APIs
                warnings.warn(f"vmamba: not registered with {package} ({type(e).__name__}: {e})", stacklevel=3)


if __name__ != "__main__":
    _register_with_imported_packages()


# --- Command line: ``python vmamba.py`` runs an offline smoke test of this file.
def _print_table(rows: List[Dict[str, Any]], columns: Sequence[str]) -> None:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    for r in [{c: c for c in columns}, *rows]:   # the header, then the rows
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)))


def _cmd_convert(args: argparse.Namespace) -> int:
    if os.path.exists(args.output):
        if os.path.exists(args.input) and os.path.samefile(args.input, args.output):
            raise ValueError(f"{args.output} is the input checkpoint; write the converted one to another file")
        if not args.force:
            raise ValueError(f"{args.output} exists; pass --force to replace it")
    checkpoint = load_checkpoint_file(download_cached(args.input) if _is_url(args.input) else args.input)
    for name in [args.model] if args.model else list_models():  # the architecture it fits exactly
        with torch.device("meta"):
            model = create_model(name)
        state, own = checkpoint_filter_fn(checkpoint, model), model.state_dict()
        if args.model or (state.keys() == own.keys() and all(state[k].shape == own[k].shape for k in own)):
            break
    else:
        raise ValueError("the checkpoint matches none of the zoo's architectures; pass --model "
                         f"(one of {list_models()}) to convert it against one")
    save_weights(_checked_state(model, state, True, args.input), args.output)   # checked: raises, saying what
    print(f"{args.input} -> {args.output}: {len(state)} tensors in the {name} layout")
    return 0


def _smoke(args: argparse.Namespace) -> int:
    """Build each model, run forward and backward, compare every backend with torch."""
    device, names = torch.device(args.device), (args.model.split(",") if args.model else list_models())
    rows, failures = [], 0
    for name in names:
        row = dict(model=name, params="-", output="-", backend="torch", time="-", status="ok")
        try:
            torch.manual_seed(0)
            model = create_model(name, pretrained=args.pretrained or False).to(device)
            row["params"] = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"
            x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
            set_backend("torch")
            start, out = time.perf_counter(), model(x)
            out.float().square().mean().backward()
            row.update(time=f"{(time.perf_counter() - start) * 1e3:.0f} ms", output="x".join(map(str, out.shape)))
            no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
            if not out.isfinite().all() or no_grad:
                raise RuntimeError(f"non-finite output or gradient missing for {no_grad[:3]}")
            with torch.no_grad():
                ref = model.eval()(x).float()
                for backend in available_backends(device)[:-1]:
                    set_backend(backend)
                    err = ((model(x).float() - ref).abs().max() / ref.abs().max()).item()
                    row["backend"] += f", {backend} (rel. err {err:.1e})"
                    if not err < 1e-3:
                        raise RuntimeError(f"backend {backend} differs from torch by {err:.1e}")
        except Exception as e:  # report every model, then fail
            row["status"], failures = f"FAILED: {type(e).__name__}: {e}", failures + 1
        finally:
            set_backend(None)
        rows.append(row)
    weights = f"pretrained={args.pretrained}" if args.pretrained else "random weights"
    print(f"vmamba.py smoke test: torch {torch.__version__}, device {device}, "
          f"{args.batch}x3x{args.img_size}x{args.img_size}, forward + backward, {weights}")
    _print_table(rows, ["model", "params", "output", "time", "backend", "status"])
    print("all ok" if not failures else f"{failures} model(s) failed")
    return 1 if failures else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vmamba.py", description="VMamba in one file. Without a command: an offline smoke test "
        "that builds the zoo models, runs forward and backward and compares every available backend.")
    parser.add_argument("--model", default=None, help=f"comma-separated model names (default: all of {list_models()})")
    parser.add_argument("--img-size", type=int, default=32, help="input resolution (default: 32)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="PATH_OR_URL",
                        help="load the released weights (needs network), or the given file/URL")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = commands.add_parser("convert", help="rewrite a checkpoint in this file's layout (.safetensors or .pth)",
                            description="Read a checkpoint in any released layout (file or URL) and write "
                            "its weights in the released key layout; .safetensors needs the safetensors package.")
    p.add_argument("input", help="checkpoint path or http(s) URL")
    p.add_argument("output", help="output path: .safetensors, or any other name for torch.save")
    p.add_argument("--model", default=None, help="zoo architecture (default: the one the checkpoint matches)")
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")
    p.set_defaults(run=_cmd_convert)
    args = parser.parse_args(argv)
    if args.command is None:
        return _smoke(args)
    try:
        return args.run(args)
    except (ValueError, OSError, RuntimeError, ImportError) as err:   # a user's error: one line, as argparse's
        print(f"vmamba.py {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
