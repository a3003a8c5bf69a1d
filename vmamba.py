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

import argparse, contextlib, hashlib, io, math, operator, os, pickle, pickletools, re, sys, time, warnings, zipfile
import importlib.util, urllib.parse
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch, torch.nn as nn, torch.nn.functional as F
from torch import Tensor

__all__ = [  # kernels, model, checkpoints, zoo and ecosystem
    "selective_scan", "selective_scan_ref", "cross_scan", "cross_merge", "ss2d_core", "available_backends",
    "set_backend", "SS2D", "VSSBlock", "VSSM", "Backbone_VSSM", "load_pretrained", "checkpoint_filter_fn",
    "load_checkpoint_file", "download_cached", "save_weights", "PickledGlobal", "PickledObject", "list_models",
    "create_model", "model_config", "pretrained_url", "EVAL_CONFIG", "vanilla_vmamba_tiny",
    "vanilla_vmamba_small", "vanilla_vmamba_base", "vmamba_tiny_s2l5", "vmamba_small_s2l15", "vmamba_base_s2l15",
    "vmamba_tiny_s1l8", "vmamba_small_s1l20", "vmamba_base_s1l20", "register_timm", "register_mm"]

# --- Optional accelerated kernels: a missing one is an error only once asked for by name.
try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except Exception:  # ImportError, or an "undefined symbol" OSError from a broken build
    _mamba_selective_scan_fn = None
# triton is imported on first use (importing it takes ~0.4 s), by _require_triton().
_HAS_TRITON, triton, tl = importlib.util.find_spec("triton") is not None, None, None
BACKENDS = ("auto", "torch", "triton", "mamba_ssm")
_INSTALL_HINTS = {"mamba_ssm": "pip install mamba-ssm --no-build-isolation (needs a CUDA toolkit matching torch)",
                  "triton": "pip install triton (Linux; ships with the CUDA builds of torch)"}
# Custom-op namespace; per module name, so "python vmamba.py" and "import vmamba" can coexist.
_OPS_NS = "vmamba_" + re.sub(r"\W", "_", __name__)
_forced_backend: Optional[str] = None


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


def _scan_chunks(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, b_plan: int) -> Tuple[Tensor, Tensor]:
    """The chunked scan of float32 channels-last inputs, dt final, A (G, N, D): y (B, L, G, D), last (B, G, N, D)."""
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
    if 2 * b_plan * L * g * d * n <= _STEP_STATES or (n == 1 and dt.requires_grad):
        a_s, x_s = list(steps(torch.exp(dt.unsqueeze(-2) * A))), list(steps((dt * u).unsqueeze(-2) * B.unsqueeze(-1)))
    elif n == 1 and not torch.compiler.is_compiling():
        dts, us, Bs = steps(dt.unsqueeze(-2)), steps(u.unsqueeze(-2)), steps(B.unsqueeze(-1))
        a_s, x_s = [torch.exp(t * A) for t in dts], [t * v * w for t, v, w in zip(dts, us, Bs)]
    else:
        (dts, dus, Bs), a_s = (steps(t) for t in (dt.unsqueeze(-2), (dt * u).unsqueeze(-2), B.unsqueeze(-1))), None
    def step(t: int, h: Tensor) -> Tensor:                            # h_t = a_t * h_{t-1} + x_t, (B, nc, G, N, D)
        a = a_s[t] if a_s else torch.exp(dts[t] * A)
        a = a.clamp_max(torch.finfo(a.dtype).max) if t == 0 else a  # meets chunk 0's zero entry state: not inf * 0
        return torch.addcmul(x_s[t] if a_s else dus[t] * Bs[t], a, h)
    h = x_s[0] if a_s else dus[0] * Bs[0]                             # pass 1: exit states from zero
    for t in range(1, T):
        h = step(t, h)
    H = _chunk_carries(torch.exp((dt.view(b, nc, T, g, d).sum(2).unsqueeze(-2) * (A / 2)).clamp_max(88.72)),
                       h)   # (B, nc, G, N, D); square roots of the chunks' decays, below float32's max (3.4e38)
    h, hs = _shifted(H, 1, 0.0), []                                   # pass 2, from the entry states
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


def _selective_scan_torch(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tuple[Tensor, Tensor]:
    """Backend "torch", channels-last: u, dt (B, L, G, D), dt final (bias and softplus applied); A (G, D, N);
    B, C (B, L, G, N). Returns y (B, L, G, D) without the D term and the last state (B, G, D, N), float32."""
    (b, L, g, d), n = u.shape, A.shape[-1]
    (b_plan, width), u, dt, B, C = _plan(b, L, g, n, d), u.float(), dt.float(), B.float(), C.float()
    A = A.float().transpose(1, 2)                                     # (G, N, D)
    blocks = zip(u.split(width, 3), dt.split(width, 3), A.split(width, 2))   # channel blocks of u, dt, A
    # N > 1 under autograd: each block's steps are recomputed in backward (kept, they would hold ~4 floats a state)
    recompute = n > 1 and torch.is_grad_enabled() and not (torch.compiler.is_compiling() or torch.jit.is_tracing())
    ys, lasts = zip(*[torch.utils.checkpoint.checkpoint(_scan_chunks, *t, B, C, b_plan, use_reentrant=False)
                      if recompute else _scan_chunks(*t, B, C, b_plan) for t in blocks])
    y, last = (ys[0], lasts[0]) if len(ys) == 1 else (torch.cat(ys, 3), torch.cat(lasts, 3))   # channel blocks
    return y, last.transpose(2, 3)                                    # (B, L, G, D), (B, G, D, N)


# --- Triton kernels and custom ops (with fakes and autograd, for torch.compile); CPU: TRITON_INTERPRET=1.
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _scan_blocks(D: int, N: int, L: int) -> Tuple[int, int, int]:
    """Tile sizes: a program owns BLOCK_D channels of a group, walking L in chunks of BLOCK_L (~2048 float32
    per tile). The one place to tune; forward and backward must agree on BLOCK_L (a state is kept per chunk)."""
    block_n = _next_pow2(N)
    block_d = min(_next_pow2(D), max(2, 32 // block_n))
    block_l = max(16, min(_next_pow2(L), 2048 // (block_d * block_n)))
    return block_d, block_n, block_l


def _define_triton_kernels() -> None:  # module-level names, which every triton version resolves
    global _affine_combine, _affine_combine_excl, _softplus_tl, _scan_fwd_kernel, _scan_bwd_kernel, _cross_kernel

    @triton.jit
    def _affine_combine(e1, b1, e2, b2):
        """Compose two steps of h -> e*e*h + b: first (e1, b1), then (e2, b2). e, the square root of a decay, is
        capped at float32's largest value, so with growth (dt*A > 0) a product over many steps stays finite (inf
        times a zero state would be NaN), and e*(e*b) is exact if it fits float32, inf if a normal b cannot."""
        return tl.minimum(e1 * e2, 3.4028234663852886e38), e2 * (e2 * b1) + b2

    @triton.jit
    def _affine_combine_excl(a1, b1, ea1, eb1, a2, b2, ea2, eb2):
        """Compose h -> a*h + b, plus the *exclusive* map (ea, eb), all steps but the last (leaf: (a, b, 1, 0)):
        yields h_t and h_{t-1} at every position without shifting registers or dividing by a (which may be 0).
        Products of decays are capped at float32's largest value, as in _affine_combine."""
        return (tl.minimum(a1 * a2, 3.4028234663852886e38), a2 * b1 + b2, tl.minimum(a1 * ea2, 3.4028234663852886e38),
                ea2 * b1 + eb2)

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
        (K*D, N); B, C (B, K, N, L); Dskip, bias (K*D,). Outputs (float32): y (B, K*D, L); states (B, K*D, n_chunks
        + 1, N), before each chunk, then after L. Per chunk, h_s = a_s h_{s-1} + b_s is an associative scan."""
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
        st_ptrs = states_ptr + (b * K * D + chan)[:, None].to(tl.int64) * (n_chunks + 1) * N + offs_n[None, :]
        is_last = (offs_l == BLOCK_L - 1)[None, None, :]
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for c in range(n_chunks):
            s = c * BLOCK_L + offs_l
            s_mask = s < L
            dl_mask, nl_mask = d_mask[:, None] & s_mask[None, :], n_mask[:, None] & s_mask[None, :]
            tl.store(st_ptrs + c * N, h, mask=dn_mask)
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
        tl.store(st_ptrs + n_chunks * N, h, mask=dn_mask)

    @triton.jit
    def _scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, Dskip_ptr, bias_ptr, dy_ptr, states_ptr,
                         du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, L, N, D, K, n_chunks,
                         HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
        """Selective-scan backward; grid, inputs as _scan_fwd_kernel, plus dy (B, K*D, L). Outputs (float32): du,
        ddelta (B, K*D, L); dB, dC (B, K, N, L), zeroed by the caller, atomically summed over a group's channel
        blocks; per-batch dA (B, K*D, N), dD, dbias (B, K*D). Chunks run last to first from the stored states:
        q_s = dL/dh_s = C_s dy_s + p_{s+1}, p_s = a_s q_s; dL/db_s = q_s, d(dt_s A): q_s a_s h_{s-1}, dC_s: dy_s h_s."""
        pid_bk, pid_d = tl.program_id(0), tl.program_id(1)
        b, k = pid_bk // K, pid_bk % K
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n, offs_l = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_L)
        d_mask, n_mask = offs_d < D, offs_n < N
        chan = k * D + offs_d
        dn_mask = d_mask[:, None] & n_mask[None, :]
        A = tl.load(A_ptr + chan[:, None] * N + offs_n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
        if HAS_D:
            Dskip = tl.load(Dskip_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)
        row = (b * K * D + chan).to(tl.int64) * L
        bc_row = ((b * K + k) * N + offs_n).to(tl.int64) * L
        st_ptrs = states_ptr + (b * K * D + chan)[:, None].to(tl.int64) * (n_chunks + 1) * N + offs_n[None, :]
        is_first = (offs_l == 0)[None, None, :]
        ones = tl.full((BLOCK_D, BLOCK_N, BLOCK_L), 1.0, tl.float32)
        zeros = tl.zeros((BLOCK_D, BLOCK_N, BLOCK_L), dtype=tl.float32)
        p = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)      # p at the step after this chunk
        dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        dD_acc, dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32), tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i in range(n_chunks):
            c = n_chunks - 1 - i
            s = c * BLOCK_L + offs_l
            s_mask = s < L
            dl_mask, nl_mask = d_mask[:, None] & s_mask[None, :], n_mask[:, None] & s_mask[None, :]
            offs_dl, offs_nl = row[:, None] + s[None, :], bc_row[:, None] + s[None, :]
            u = tl.load(u_ptr + offs_dl, mask=dl_mask, other=0.0).to(tl.float32)
            z = tl.load(delta_ptr + offs_dl, mask=dl_mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                z += bias[:, None]
            dt = _softplus_tl(z) if SOFTPLUS else z
            dt = tl.where(dl_mask, dt, 0.0)
            Bv = tl.load(B_ptr + offs_nl, mask=nl_mask, other=0.0).to(tl.float32)
            Cv = tl.load(C_ptr + offs_nl, mask=nl_mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs_dl, mask=dl_mask, other=0.0).to(tl.float32)
            # Recompute the forward states of this chunk: h_{s-1} from the exclusive prefix.
            h0 = tl.load(st_ptrs + c * N, mask=dn_mask, other=0.0)
            a = tl.minimum(tl.exp(dt[:, None, :] * A[:, :, None]), 3.4028234663852886e38)   # (BD, BN, BL)
            bx = (dt * u)[:, None, :] * Bv[None, :, :]
            _, _, ea, eb = tl.associative_scan((a, bx, ones, zeros), axis=2, combine_fn=_affine_combine_excl)
            a_hprev = a * (ea * h0[:, :, None] + eb)            # a_s * h_{s-1}
            hs = a_hprev + bx                                   # h_s
            # Adjoint, backwards in time: exclusive reverse prefix gives p_{s+1}.
            cdy = Cv[None, :, :] * dy[:, None, :]
            _, _, ra, rb = tl.associative_scan((a, a * cdy, ones, zeros), axis=2,
                                               combine_fn=_affine_combine_excl, reverse=True)
            q = cdy + ra * p[:, :, None] + rb                  # dL/dh_s
            p = tl.sum(tl.where(is_first, a * q, 0.0), axis=2)
            # Parameter and input gradients (padded steps/states have q = 0 and dt = 0).
            qa_h = q * a_hprev                                  # dL/d(dt_s * A)
            ddt = tl.sum(qa_h * A[:, :, None] + q * Bv[None, :, :] * u[:, None, :], axis=1)
            du = dt * tl.sum(q * Bv[None, :, :], axis=1)
            if HAS_D:
                du += Dskip[:, None] * dy
                dD_acc += tl.sum(dy * u, axis=1)
            dA_acc += tl.sum(qa_h * dt[:, None, :], axis=2)
            ddelta = ddt * tl.sigmoid(z) if SOFTPLUS else ddt
            if HAS_BIAS:
                dbias_acc += tl.sum(tl.where(dl_mask, ddelta, 0.0), axis=1)
            tl.store(du_ptr + offs_dl, du, mask=dl_mask)
            tl.store(ddelta_ptr + offs_dl, ddelta, mask=dl_mask)
            # B and C are shared by the group's channels: reduce this block, add atomically.
            dB, dC = tl.sum(q * (dt * u)[:, None, :], axis=0), tl.sum(hs * dy[:, None, :], axis=0)  # (BN, BL)
            tl.atomic_add(dB_ptr + offs_nl, dB, mask=nl_mask)
            tl.atomic_add(dC_ptr + offs_nl, dC, mask=nl_mask)
        part = (b * K * D + chan).to(tl.int64)
        tl.store(dA_ptr + part[:, None] * N + offs_n[None, :], dA_acc, mask=dn_mask)
        if HAS_D:
            tl.store(dD_ptr + part, dD_acc, mask=d_mask)
        if HAS_BIAS:
            tl.store(dbias_ptr + part, dbias_acc, mask=d_mask)

    @triton.jit
    def _cross_kernel(src_ptr, dst_ptr, C, H, W, stride_k, MERGE: tl.constexpr, BLOCK: tl.constexpr):
        """Cross-scan (MERGE=False) or cross-merge; grid (batch * C, cdiv(H*W, BLOCK)). Pixel p = h*W + w, t = w*H + h
        is at p, t, L-1-p, L-1-t of sequences k = 0..3. Merge sums in float32. Contiguous, dtype of src."""
        pid_bc, pid_l = tl.program_id(0), tl.program_id(1)
        L, b, ch = H * W, pid_bc // C, pid_bc % C
        p = pid_l * BLOCK + tl.arange(0, BLOCK)
        mask, t = p < L, (p % W) * H + p // W
        pix = pid_bc.to(tl.int64) * L + p                       # offsets into the (B, C, H, W) map
        seq0 = (b * 4 * C + ch).to(tl.int64) * L               # start of sequence k=0 for (b, ch)
        seq1 = seq0 + stride_k                                  # stride_k = C * L
        seq2 = seq1 + stride_k
        seq3 = seq2 + stride_k
        offs = (seq0 + p, seq1 + t, seq2 + (L - 1 - p), seq3 + (L - 1 - t))
        if MERGE:
            acc = tl.load(src_ptr + offs[0], mask=mask, other=0.0).to(tl.float32)
            acc += tl.load(src_ptr + offs[1], mask=mask, other=0.0).to(tl.float32)
            acc += tl.load(src_ptr + offs[2], mask=mask, other=0.0).to(tl.float32)
            acc += tl.load(src_ptr + offs[3], mask=mask, other=0.0).to(tl.float32)
            tl.store(dst_ptr + pix, acc.to(dst_ptr.dtype.element_ty), mask=mask)
        else:
            x = tl.load(src_ptr + pix, mask=mask)
            tl.store(dst_ptr + offs[0], x, mask=mask)
            tl.store(dst_ptr + offs[1], x, mask=mask)
            tl.store(dst_ptr + offs[2], x, mask=mask)
            tl.store(dst_ptr + offs[3], x, mask=mask)


def _require_triton() -> None:
    """Import triton and define the kernels (once), or raise saying how to install it."""
    global triton, tl
    if not _HAS_TRITON:
        raise RuntimeError(f"backend 'triton' is not available; install it with: {_INSTALL_HINTS['triton']}")
    if tl is None:
        import triton
        _define_triton_kernels()
        import triton.language as tl  # last: a non-None tl says the kernels are defined


# --- Selective scan: custom ops and autograd
def _scan_dims(u, A, Bs):
    Bsz, KD, L = u.shape
    K, N = Bs.shape[1], A.shape[1]
    if KD % K != 0:
        raise ValueError(f"K*D={KD} is not a multiple of K={K}")
    return Bsz, K, KD // K, N, L


def _scan_launch(kernel, u, delta, A, Bs, Cs, Ds, delta_bias, softplus, *rest):
    """Run a scan kernel; rest: its remaining (contiguous) pointers. An absent Ds/delta_bias gets a dummy."""
    Bsz, K, D, N, L = _scan_dims(u, A, Bs)
    block_d, block_n, block_l = _scan_blocks(D, N, L)
    kernel[(Bsz * K, triton.cdiv(D, block_d))](
        *(t.contiguous() for t in (u, delta, A, Bs, Cs)),
        u if Ds is None else Ds.contiguous(), u if delta_bias is None else delta_bias.contiguous(),
        *rest, L, N, D, K, triton.cdiv(L, block_l), HAS_D=Ds is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=softplus, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l, num_warps=4)


def _scan_fwd_outputs(u, A, Bs, Cs):
    Bsz, K, D, N, L = _scan_dims(u, A, Bs)
    if not tuple(Bs.shape) == tuple(Cs.shape) == (Bsz, K, N, L):
        raise ValueError(f"B and C must be (batch, K, N, L) = {(Bsz, K, N, L)}, got {list(Bs.shape)}, {list(Cs.shape)}")
    n_chunks = -(-L // _scan_blocks(D, N, L)[2])
    return (u.new_empty((Bsz, K * D, L), dtype=torch.float32),
            u.new_empty((Bsz, K * D, n_chunks + 1, N), dtype=torch.float32))


@torch.library.custom_op(f"{_OPS_NS}::selective_scan_fwd", mutates_args=())
def _selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, Bs: Tensor, Cs: Tensor, Ds: Optional[Tensor],
                        delta_bias: Optional[Tensor], delta_softplus: bool) -> Tuple[Tensor, Tensor]:
    """Returns y (B, K*D, L) and states (B, K*D, n_chunks + 1, N), float32: before each chunk, then after L."""
    _require_triton()
    y, states = _scan_fwd_outputs(u, A, Bs, Cs)
    _scan_launch(_scan_fwd_kernel, u, delta, A, Bs, Cs, Ds, delta_bias, delta_softplus, y, states)
    return y, states


@_selective_scan_fwd.register_fake
def _(u, delta, A, Bs, Cs, Ds, delta_bias, delta_softplus):
    return _scan_fwd_outputs(u, A, Bs, Cs)


@torch.library.custom_op(f"{_OPS_NS}::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd(dy: Tensor, u: Tensor, delta: Tensor, A: Tensor, Bs: Tensor, Cs: Tensor,
                        Ds: Optional[Tensor], delta_bias: Optional[Tensor], states: Tensor,
                        delta_softplus: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias) in the inputs' dtypes; absent D, bias: (K*D,) float32 zeros."""
    _require_triton()
    Bsz, K, D, N, L = _scan_dims(u, A, Bs)
    f32 = dict(device=u.device, dtype=torch.float32)
    du, ddelta = torch.empty((Bsz, K * D, L), **f32), torch.empty((Bsz, K * D, L), **f32)
    dB, dC = torch.zeros((Bsz, K, N, L), **f32), torch.zeros((Bsz, K, N, L), **f32)  # atomic targets
    dA = torch.zeros((Bsz, K * D, N), **f32)                   # per-batch partials
    dD, dbias = torch.zeros((Bsz, K * D), **f32), torch.zeros((Bsz, K * D), **f32)
    _scan_launch(_scan_bwd_kernel, u, delta, A, Bs, Cs, Ds, delta_bias, delta_softplus,
                 dy.contiguous(), states.contiguous(), du, ddelta, dA, dB, dC, dD, dbias)
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(A.dtype), dB.to(Bs.dtype), dC.to(Cs.dtype),
            *(g.sum(0).to(torch.float32 if t is None else t.dtype) for g, t in ((dD, Ds), (dbias, delta_bias))))


@_selective_scan_bwd.register_fake
def _(dy, u, delta, A, Bs, Cs, Ds, delta_bias, states, delta_softplus):
    return (*(t.new_empty(t.shape) for t in (u, delta, A, Bs, Cs)),   # contiguous, as the kernel writes them
            *(u.new_empty(u.shape[1:2], dtype=torch.float32 if t is None else t.dtype) for t in (Ds, delta_bias)))


def _selective_scan_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7], output[1])   # u, delta, A, Bs, Cs, Ds, delta_bias, states
    ctx.delta_softplus = inputs[7]
    ctx.mark_non_differentiable(output[1])


def _selective_scan_backward(ctx, dy, dstates):
    saved = ctx.saved_tensors   # u, delta, A, Bs, Cs, Ds, delta_bias, states: _selective_scan_bwd's order
    Ds, delta_bias = saved[5:7]
    du, ddelta, dA, dB, dC, dD, dbias = _selective_scan_bwd(dy, *saved, ctx.delta_softplus)
    return du, ddelta, dA, dB, dC, dD if Ds is not None else None, dbias if delta_bias is not None else None, None


_selective_scan_fwd.register_autograd(_selective_scan_backward, setup_context=_selective_scan_setup_context)


def _selective_scan_triton(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Grouped selective scan as :func:`selective_scan_ref` (no z), shapes as _scan_fwd_kernel. Returns y (batch,
    K*D, L) float32, differentiable in all inputs, and last_state (batch, K*D, N) float32, not differentiable."""
    y, states = _selective_scan_fwd(u, delta, A, B, C, D, delta_bias, bool(delta_softplus))
    return y, states[:, :, -1]


# --- Cross-scan / cross-merge: custom ops, each the other's backward
def _cross_launch(src: Tensor, merge: bool) -> Tensor:
    """Scan x (B, C, H, W) -> (B, 4, C, H*W), or merge ys (B, 4, C, H, W) -> (B, C, H, W)."""
    _require_triton()
    Bsz, (C, H, W), L = src.shape[0], src.shape[-3:], src.shape[-2] * src.shape[-1]
    dst = torch.empty((Bsz, C, H, W) if merge else (Bsz, 4, C, L), device=src.device, dtype=src.dtype)
    block = min(1024, _next_pow2(L))
    _cross_kernel[(Bsz * C, triton.cdiv(L, block))](src.contiguous(), dst, C, H, W, C * L, MERGE=merge,
                                                    BLOCK=block, num_warps=4)
    return dst


@torch.library.custom_op(f"{_OPS_NS}::cross_scan", mutates_args=())
def _cross_scan(x: Tensor) -> Tensor:
    return _cross_launch(x, merge=False)


@_cross_scan.register_fake
def _(x):
    return x.new_empty((x.shape[0], 4, x.shape[1], x.shape[2] * x.shape[3]))


@torch.library.custom_op(f"{_OPS_NS}::cross_merge", mutates_args=())
def _cross_merge(ys: Tensor) -> Tensor:
    return _cross_launch(ys, merge=True)


@_cross_merge.register_fake
def _(ys):
    return ys.new_empty((ys.shape[0], *ys.shape[2:]))


def _save_hw(ctx, inputs, output):
    ctx.hw = inputs[0].shape[-2:]


_cross_scan.register_autograd(lambda ctx, g: _cross_merge(g.reshape(*g.shape[:3], *ctx.hw)), setup_context=_save_hw)
_cross_merge.register_autograd(lambda ctx, g: _cross_scan(g).reshape(g.shape[0], 4, g.shape[1], *ctx.hw),
                               setup_context=_save_hw)


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
    """Force the backend ``"auto"`` resolves to, process-wide (over ``VMAMBA_BACKEND``); ``None`` restores it."""
    global _forced_backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or None")
    _forced_backend = None if name == "auto" else name


def _resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a requested backend into the one that runs, or raise saying how to get it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        backend = _forced_backend or os.environ.get("VMAMBA_BACKEND") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"VMAMBA_BACKEND={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        best = available_backends(device)[0] if device.type == "cuda" else "torch"
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
    if backend == "triton" and not _triton_usable(device):
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
        y, last = _selective_scan_triton(u, delta, A, B, C, D, delta_bias, delta_softplus)
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
    """(B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, and both reversed."""
    if x.ndim != 4:
        raise ValueError(f"cross_scan expects (B, C, H, W), got shape {tuple(x.shape)}")
    if _resolve_backend(backend, x.device) == "triton":
        return _cross_scan(x)
    return _to_sequences(x.permute(0, 2, 3, 1)).permute(0, 2, 3, 1)


def cross_merge(ys: Tensor, backend: str = "auto") -> Tensor:
    """(B, 4, C, H, W) -> (B, C, H, W): the adjoint of :func:`cross_scan`. Sequence k of ``ys`` is in scan
    order (its H, W dims are only a shape); each is mapped back to its pixels and the four are summed."""
    if ys.ndim != 5 or ys.shape[1] != 4:
        raise ValueError(f"cross_merge expects (B, 4, C, H, W), got shape {tuple(ys.shape)}")
    if _resolve_backend(backend, ys.device) == "triton":
        return _cross_merge(ys)
    return _from_sequences(ys.flatten(3).permute(0, 3, 1, 2), *ys.shape[3:]).permute(0, 3, 1, 2)


def _ss2d_core(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, dt_projs_bias: Tensor,
               A_logs: Tensor, Ds: Tensor, backend: str) -> Tensor:   # see ss2d_core
    (b, h, w, d), n, r = x.shape, A_logs.shape[1], dt_projs_weight.shape[2]
    backend = _resolve_backend(backend, x.device)
    w_proj, w_dt = (t.to(x.dtype) for t in (x_proj_weight, dt_projs_weight))   # see below; the dt bias too
    proj = _to_sequences(torch.einsum("bhwd,kcd->bhwkc", x, w_proj))  # per pixel, then (B, L, 4, R+2N)
    dts, Bs, Cs = proj.split([r, n, n], dim=-1)                       # (B, L, 4, R|N|N)
    A = -torch.exp(A_logs.float())                                    # (4*D, N)
    if backend == "torch":  # in the scan's blocks of channels, so that a large map's temporaries stay small
        low, width, parts = dts.permute(2, 0, 1, 3).flatten(1, 2), _plan(b, h * w, 4, n, d)[1], []   # (4, B*L, R)
        for xc, wc, bc, Ac in zip(x.split(width, 3), w_dt.split(width, 1), dt_projs_bias.to(x.dtype).split(width, 1),
                                  A.view(4, d, n).split(width, 1)):   # (B, H, W, Dc), (4, Dc, R), (4, Dc), (4, Dc, N)
            dt = torch.bmm(low, wc.transpose(1, 2)) + bc.unsqueeze(1)   # (4, B*L, Dc); compiled, the bias fuses
            dt = _softplus(dt.float()).view(4, b, -1, xc.shape[3]).permute(1, 2, 0, 3)   # (B, L, 4, Dc)
            parts.append(_from_sequences(_selective_scan_torch(_to_sequences(xc), dt, Ac, Bs, Cs)[0], h, w))
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
              A_logs: Tensor, Ds: Tensor, backend: str = "auto") -> Tensor:
    """SS2D's four-direction scan, ``cross_merge(selective_scan(cross_scan(x), ...))``: x (B, H, W, D); x_proj_weight
    (4, R + 2N, D); dt_projs_weight (4, D, R); dt_projs_bias (4, D); A_logs (4*D, N); Ds (4*D,) -> (B, H, W, D)."""
    core = _ss2d_core_region if torch.compiler.is_dynamo_compiling() and not torch.is_grad_enabled() else _ss2d_core
    return core(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, backend)


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


class SS2D(nn.Module):
    """2-D selective scan, VMamba's attention: (B, H, W, d_model) in and out, (B, d_model, H, W) with
    ``channel_first``. ``forward_type`` "v0"/"v05" gate the output with ``silu(z)`` from a second half of
    ``in_proj``; "v05_noz" does not. ``backend`` (attribute, default "auto"): this layer's scan backend."""

    def __init__(self, d_model: int = 96, d_state: int = 16, ssm_ratio: float = 2.0,
                 dt_rank: Union[int, str] = "auto", act_layer: str = "silu", d_conv: int = 3,
                 conv_bias: bool = True, dropout: float = 0.0, bias: bool = False,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, initialize: str = "v0",
                 forward_type: str = "v05_noz", channel_first: bool = False):
        super().__init__()
        self.forward_type = _one_of("forward_type", forward_type, FORWARD_TYPES)
        _one_of("ssm_act_layer", act_layer, ("silu",))
        _one_of("dt_init", dt_init, ("random",))
        _one_of("ssm_init", initialize, ("v0",))
        _check_range("d_model", d_model, 1, integer=True)
        _check_range("ssm_d_state", d_state, 1, integer=True)
        _check_range("ssm_ratio", ssm_ratio, 0, low_open=True)
        _check_range("ssm_conv", d_conv, 1, integer=True)
        if d_conv % 2 == 0:
            raise ValueError(f"ssm_conv must be odd (a centred kernel keeps the map's size), got {d_conv}")
        _check_range("ssm_drop_rate", dropout, 0, 1)
        if dt_rank != "auto":
            _check_range("ssm_dt_rank", dt_rank, 1, integer=True)
        for name, value in (("ssm_conv_bias", conv_bias), ("bias", bias), ("channel_first", channel_first)):
            _one_of(name, value, (False, True))
        _check_range("dt_min", dt_min, 0, low_open=True)   # log-uniform between dt_min and dt_max
        _check_range("dt_max", dt_max, dt_min)
        _check_range("dt_scale", dt_scale, 0)
        _check_range("dt_init_floor", dt_init_floor, 0)
        k, d_inner = 4, int(ssm_ratio * d_model)
        if d_inner < 1:
            raise ValueError(f"ssm_ratio * d_model must be >= 1, got {ssm_ratio} * {d_model}")
        rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.d_inner, self.d_state, self.dt_rank, self.channel_first = d_inner, d_state, rank, channel_first
        self.gated, self.backend = self.forward_type in ("v0", "v05"), "auto"

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
        y = ss2d_core(F.silu(x), self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias,
                      self.A_logs, self.Ds, backend=self.backend)     # (B, H, W, D)
        y = self.out_norm(y)
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
                 gmlp: bool = False, post_norm: bool = False):
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
                       dropout=ssm_drop_rate, initialize=ssm_init, forward_type=forward_type)
        self.drop_path = DropPath(drop_path)
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(hidden_dim)
            self.mlp = Mlp(hidden_dim, int(hidden_dim * mlp_ratio), drop=mlp_drop_rate)
        else:
            self.norm2 = self.mlp = None

    def forward(self, x: Tensor) -> Tensor:
        # channel_first: branches on (B, H, W, C) views, sums on the maps (inductor lays out 4-D sums as NCHW ones)
        for norm, op in ((self.norm, self.op), (self.norm2, self.mlp)):
            if op is not None:
                h = x.permute(0, 2, 3, 1) if self.channel_first else x   # (B, H, W, C)
                h = norm(op(h)) if self.post_norm else op(norm(h))
                x = x + self.drop_path(h.permute(0, 3, 1, 2) if self.channel_first else h)
        return x


class PatchMerging(nn.Module):
    """Downsample "v1": 2x2 neighbours concatenated, LayerNorm(4C), Linear(4C, 2C); NHWC (NCHW if channel_first)."""

    def __init__(self, dim: int, out_dim: int, channel_first: bool = False):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)
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
                             Permute(0, 2, 3, 1), nn.LayerNorm(dim), Permute(0, 3, 1, 2))
    stride = patch_size // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, 3, stride=stride, padding=1), Permute(0, 2, 3, 1), nn.LayerNorm(dim // 2),
        Permute(0, 3, 1, 2), nn.GELU(), nn.Conv2d(dim // 2, dim, 3, stride=stride, padding=1), Permute(0, 2, 3, 1),
        nn.LayerNorm(dim), Permute(0, 3, 1, 2))


def _make_downsample(version: str, dim: int, out_dim: int) -> nn.Module:
    """(B, dim, H, W) -> (B, out_dim, ceil(H/2), ceil(W/2)), channels-last memory in and out."""
    if version == "v1":
        return PatchMerging(dim, out_dim, channel_first=True)
    conv = nn.Conv2d(dim, out_dim, 2, stride=2) if version == "v2" else nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
    # Index 0 is the authors' Permute (channels-last models) or Identity (channels-first ones).
    return nn.Sequential(nn.Identity(), conv, Permute(0, 2, 3, 1), nn.LayerNorm(out_dim), Permute(0, 3, 1, 2))


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
    """Record of an object a checkpoint would have built by calling a global; nothing was called. ``factory``:
    the :class:`PickledGlobal` called (or the record, called again); ``args``, ``kwargs``: its arguments; ``state``:
    what ``__setstate__`` would have got (e.g. ``__dict__``); ``dictitems``: a dict subclass's items (yacs' CfgNode)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "PickledObject":
        # torch's loader calls cls(*args) (REDUCE) or cls.__new__(cls, *args) (NEWOBJ).
        self = super().__new__(cls)
        self.factory, self.args, self.kwargs, self.state, self.dictitems = cls, args, kwargs, None, {}
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> "PickledObject":
        record = type(self)(*args, **kwargs)
        record.factory = self
        return record

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dictitems[key] = value

    @property
    def global_name(self) -> str:   # the global at the root of the factory chain
        return str(type(self))

    def __repr__(self) -> str:   # short: args and state may hold large tensors or cycles
        return f"<PickledObject {self.global_name}>"


class PickledGlobal(type):
    """Stand-in, never imported, for the class or function a checkpoint names as ``module.name``: a class whose
    instances are :class:`PickledObject` records of calls to it. For torch's loader, which tests types with ``in``,
    it equals ``OrderedDict`` (allowlisted anyway; so its records take items) and its records (so they're callable)."""

    def __new__(mcs, module: str, name: str) -> "PickledGlobal":
        return super().__new__(mcs, "PickledGlobal", (PickledObject,), {"__module__": module, "__qualname__": name})

    def __init__(cls, module: str, name: str) -> None:
        super().__init__("PickledGlobal", (PickledObject,), {})

    module, name = property(lambda cls: cls.__module__), property(lambda cls: cls.__qualname__)

    def __str__(cls) -> str:
        return f"{cls.module}.{cls.name}"

    def __repr__(cls) -> str:
        return f"<PickledGlobal {cls}>"

    def __eq__(cls, other: Any) -> bool:
        if isinstance(other, PickledGlobal):
            return (cls.module, cls.name) == (other.module, other.name)
        return other is OrderedDict or type(other) is cls

    def __hash__(cls) -> int:
        return hash((cls.module, cls.name))


_BLOCKED_ALIAS = "(blocked)."


def _unblocked(source: str) -> Union[str, io.BytesIO]:
    """``source``, or an in-memory copy in which globals torch refuses even if allowlisted get prefix _BLOCKED_ALIAS."""
    with zipfile.ZipFile(source) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1)
        data = archive.read(pkl)
        cuts = [pos + 1 for op, arg, pos in pickletools.genops(data)
                if op.name == "GLOBAL" and arg.split(" ", 1)[0] in ("sys", "os", "posix", "nt")]
        if not cuts:
            return source
        data = _BLOCKED_ALIAS.encode().join(data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)]))
        copy = io.BytesIO()
        with zipfile.ZipFile(copy, "w") as out:
            for info in archive.infolist():
                out.writestr(info, data if info.filename == pkl else archive.read(info))
    copy.seek(0)
    return copy


def _weights_only_load(source: Union[str, io.BytesIO]) -> Any:
    if isinstance(source, io.BytesIO):
        source.seek(0)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except BaseException:
        # A failed load leaves its sparse tensors queued for validation by (and failing) the next: empty the queue.
        buffer = io.BytesIO()
        torch.save({}, buffer)
        buffer.seek(0)
        with warnings.catch_warnings(), contextlib.suppress(Exception):
            warnings.simplefilter("ignore")
            torch.load(buffer, weights_only=True)
        raise


def _safetensors(purpose: str) -> Any:
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError(f"{purpose} needs the safetensors package: pip install safetensors") from err
    return safetensors.torch


def load_checkpoint_file(path: Union[str, os.PathLike]) -> Any:
    """Load a checkpoint onto the CPU without running code from it: ``.safetensors`` (by name or content) with
    safetensors, others with ``torch.load(weights_only=True)``; if that refuses a zip checkpoint, each global outside
    torch's allowlist (``os.system`` ... too) is allowlisted for one more load as an inert :class:`PickledGlobal`
    building :class:`PickledObject` records. Legacy non-zip files only if torch accepts them. Raises OSError as
    ``open``, ImportError (with the pip command) for .safetensors without safetensors, ValueError for a bad file."""
    source = os.fspath(path)
    with open(source, "rb") as file:
        head, size = file.read(9), os.fstat(file.fileno()).st_size
    try:
        if source.endswith(".safetensors") or (head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size):
            return _safetensors(f"{source} is a safetensors file, which").load_file(source, device="cpu")
        try:
            return _weights_only_load(source)
        except pickle.UnpicklingError:
            if not head.startswith(b"PK\x03\x04"):
                raise
        unblocked = _unblocked(source)
        placeholders = [(PickledGlobal(*full_name.removeprefix(_BLOCKED_ALIAS).rpartition(".")[::2]), full_name)
                        for full_name in torch.serialization.get_unsafe_globals_in_checkpoint(unblocked)]
        with torch.serialization.safe_globals(placeholders):
            return _weights_only_load(unblocked)
    except ImportError:
        raise
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        if isinstance(err, pickle.UnpicklingError) and head.startswith(b"\x80\x02\x8a\x0a"):   # legacy magic
            reason = ("torch.load(weights_only=True) refused it, and files in torch.save's legacy non-zip format "
                      "(_use_new_zipfile_serialization=False) are read no other way; re-save it in the default "
                      "zip format where it is trusted")
        raise ValueError(f"{source} could not be read as a PyTorch checkpoint: {reason}") from err


def _cache_file_name(url: str) -> str:
    """The URL's last path segment, percent-decoded, other than [A-Za-z0-9._+-] -> '_', no leading dots, <= 200."""
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1], errors="replace")
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".")
    if not name:
        raise ValueError(f"cannot derive a cache file name from URL {url!r}")
    if len(name) > 200:
        stem, ext = os.path.splitext(name)
        name = f"{stem[:183 - len(ext[:20])]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}{ext[:20]}"
    return name


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_cached(url: str, sha256: Optional[str] = None, progress: bool = True,
                    cache_dir: Union[str, os.PathLike, None] = None) -> str:
    """Download an http(s) ``url`` once to ``cache_dir`` (default ``<torch.hub.get_dir()>/checkpoints``) under its
    last path segment; return the path. ``sha256`` (hex digest or >= 8-digit prefix) is checked on every call: a
    cached mismatch is downloaded again (warning), a downloaded one deleted (ValueError). A failed or truncated
    download raises RuntimeError naming the URL and cache path, leaving no file."""
    if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        raise ValueError(f"only http(s) URLs can be downloaded, got {url!r}")
    expected = None if sha256 is None else sha256.strip().lower()
    if expected is not None and not re.fullmatch(r"[0-9a-f]{8,64}", expected):
        raise ValueError(f"sha256 must be a SHA-256 hex digest or a prefix of at least 8 hex digits, got {sha256!r}")
    cache_dir = os.fspath(os.path.join(torch.hub.get_dir(), "checkpoints") if cache_dir is None else cache_dir)
    dest = os.path.join(cache_dir, _cache_file_name(url))
    if os.path.isfile(dest):
        if expected is None or (actual := _file_sha256(dest)).startswith(expected):
            return dest
        warnings.warn(f"Cached file {dest} has SHA-256 {actual}, expected {expected}; downloading {url} again",
                      stacklevel=2)
        os.remove(dest)
    os.makedirs(cache_dir, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, dest, hash_prefix=None, progress=progress)
        with open(dest, "rb") as file:   # urllib does not report a connection closed early
            if file.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(dest):
                raise EOFError("the zip archive is incomplete: the connection closed early")
    except Exception as err:
        with contextlib.suppress(FileNotFoundError):
            os.remove(dest)
        raise RuntimeError(f"Failed to download {url} to {dest}: {err}") from err
    if expected is not None and not (actual := _file_sha256(dest)).startswith(expected):
        os.remove(dest)
        raise ValueError(f"SHA-256 mismatch for {url}: expected {expected}, got {actual}; the download was deleted")
    return dest


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
                         + (f" with keys {sorted(ckpt)[:8]}" if isinstance(ckpt, dict) else ""))
    return {k: v for k, v in ckpt.items() if isinstance(v, Tensor)}


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
    unknown keys are passed through (``load_pretrained`` reports them)."""
    state = _unwrap_checkpoint(checkpoint)
    if any(k.startswith("backbone.") for k in state):   # detection/segmentation: keep the backbone
        state = {k: v for k, v in state.items() if k.startswith("backbone.")}
    own, out = model.state_dict(), {}
    for key, value in state.items():
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
        if key in own and value.shape != own[key].shape and value.numel() == own[key].numel() \
                and key.rsplit(".", 1)[-1] in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias"):
            value = value.reshape(own[key].shape)
        if (key == _FIRST_CONV and key in own and value.ndim == 4 and value.shape[1] == 3
                and own[key].shape[1] != 3 and value.shape[2:] == own[key].shape[2:]):
            value = _adapt_input_conv(value, own[key].shape[1])
        out[key] = value
    if "classifier.head.weight" not in own:  # no head (num_classes=0) or no classifier at all
        out = {k: v for k, v in out.items() if not k.startswith("classifier.head.")}
    if not hasattr(model, "classifier"):
        out = {k: v for k, v in out.items() if not k.startswith("classifier.")}
    return out


def _is_url(source: Any) -> bool:
    return isinstance(source, str) and source.split("://", 1)[0].lower() in ("http", "https")


def load_pretrained(model: nn.Module, source: Any, strict: bool = True,
                    sha256: Optional[str] = None, progress: bool = True) -> nn.Module:
    """Load weights into ``model`` from a path (PyTorch or ``.safetensors``), an http(s) URL or a state dict.
    URLs are downloaded once into torch.hub's cache, checked against ``sha256`` when given; any layout of
    :func:`checkpoint_filter_fn`; files are read without running code. ``strict``: every parameter must load with
    the right shape, except a head of another class count (left fresh, with a warning) and a backbone's ``outnorm``
    layers. On any error the model is left unchanged. Returns ``model``."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        path = download_cached(source, sha256=sha256, progress=progress) if _is_url(source) else source
        checkpoint = load_checkpoint_file(path)
    elif isinstance(source, dict):
        checkpoint = source
    else:
        raise TypeError(f"source must be a path, an http(s) URL or a state dict, got {type(source).__name__}")
    name = source if isinstance(source, str) else "the given state dict"
    try:
        state = checkpoint_filter_fn(checkpoint, model)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    own, tolerated, head = model.state_dict(), set(), "classifier.head.weight"
    if (head in own and head in state and state[head].ndim == 2
            and state[head].shape[0] != own[head].shape[0] and state[head].shape[1] == own[head].shape[1]):
        warnings.warn(f"vmamba: the checkpoint's head has {state[head].shape[0]} classes and the model "
                      f"{own[head].shape[0]}: classifier.head is left freshly initialised.", stacklevel=2)
        state = {k: v for k, v in state.items() if not k.startswith("classifier.head.")}
        tolerated |= {k for k in own if k.startswith("classifier.head.")}
    if not any(k.startswith("outnorm") for k in state):
        tolerated |= {k for k in own if k.startswith("outnorm")}
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
                             "Is it a checkpoint of another architecture? The model is unchanged.")
        warnings.warn(f"vmamba: partial load of {name} ({report}): {examples}", stacklevel=2)
        state = {k: v for k, v in state.items() if k in own and state[k].shape == own[k].shape}
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    return model


# --- The model: VSSM (classification) and Backbone_VSSM (detection, segmentation), built of the layers.
class VSSM(nn.Module):
    """VMamba classifier; keyword names are the authors', so their configs work. Defaults build VMamba-T (s1l8).

    ``forward_type`` "v0" | "v05" | "v05_noz"; ``patchembed_version`` "v1" | "v2"; ``downsample_version`` "v1" |
    "v2" | "v3"; ``norm_layer`` "ln" | "ln2d" (same weights and outputs); ``global_pool`` "avg" | "" (output: the
    normalised map). ``dims``: the first stage's width (doubled per stage) or one per stage. ``device``, ``dtype``:
    PyTorch's factory keywords (timm passes them). Input: float (B, in_chans, H, W) in the model's dtype (or any
    under autocast); output: (B, num_classes). Every argument is checked here: TypeError for a wrong type, ValueError
    for a wrong value, and at most 1024 blocks and about 2**33 weights."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 depths: Sequence[int] = (2, 2, 8, 2), dims: Union[int, Sequence[int]] = 96, ssm_d_state: int = 1,
                 ssm_ratio: float = 1.0, ssm_dt_rank: Union[int, str] = "auto", ssm_act_layer: str = "silu",
                 ssm_conv: int = 3, ssm_conv_bias: bool = False, ssm_drop_rate: float = 0.0, ssm_init: str = "v0",
                 forward_type: str = "v05_noz", mlp_ratio: float = 4.0, mlp_act_layer: str = "gelu",
                 mlp_drop_rate: float = 0.0, gmlp: bool = False, drop_path_rate: float = 0.2, patch_norm: bool = True,
                 norm_layer: str = "ln2d", downsample_version: str = "v3", patchembed_version: str = "v2",
                 use_checkpoint: bool = False, posembed: bool = False, imgsize: int = 224, check_finite: bool = False,
                 global_pool: str = "avg", device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
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
        self.check_finite, self.grad_checkpointing = check_finite, use_checkpoint
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
                    mlp_drop_rate=mlp_drop_rate, gmlp=gmlp) for j in range(depth)])
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
        fmt = _one_of("output_fmt", output_fmt, ("nchw", "nhwc"))
        n = len(self.layers)
        indices = self._stage_indices(indices)
        last = max(indices) if (stop_early or intermediates_only) else n - 1
        x = self.patch_embed(self._check_input(x))                    # (B, C0, H/4, W/4)
        intermediates = []
        for i in range(last + 1):
            x = self._stage(i, x)                                     # (B, C_i, H_i, W_i)
            if i in indices:
                o = x.permute(0, 2, 3, 1)                             # (B, H_i, W_i, C_i)
                o = self.classifier.norm(o) if (norm and i == n - 1) else o
                intermediates.append(o.permute(0, 3, 1, 2) if fmt == "nchw" else o)
            x = self.layers[i].downsample(x)
        if intermediates_only:
            return intermediates
        return (x if fmt == "nchw" else x.permute(0, 2, 3, 1)), intermediates

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop what feature extraction at stages ``indices`` never uses (timm's API): later stages and the last
        one's downsample; the classifier's Linear with ``prune_head``, its LayerNorm with ``prune_norm``. Afterwards
        the model is only for :meth:`forward_intermediates`. Returns the indices as stage numbers."""
        indices = self._stage_indices(indices)
        last = max(indices)
        self.layers = self.layers[:last + 1]
        self.layers[last].downsample = nn.Identity()
        if hasattr(self, "classifier"):  # Backbone_VSSM has none
            if prune_head:
                self.reset_classifier(0)
            if prune_norm or last < len(self.dims) - 1:
                self.classifier.norm = nn.Identity()
        return indices

    def forward_features(self, x: Tensor) -> Tensor:
        """Final stage's map, (B, num_features, H/32, W/32), before the classifier's norm."""
        x = self.patch_embed(self._check_input(x))                    # (B, C0, H/4, W/4)
        for i, layer in enumerate(self.layers):
            x = layer.downsample(self._stage(i, x))
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
    URL or state dict to load (a classification checkpoint works: its head is ignored)."""

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), pretrained: Any = None,
                 norm_layer: str = "ln", **kwargs: Any):
        if (isinstance(out_indices, str) or not isinstance(out_indices, Sequence)
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in out_indices)):
            raise TypeError(f"out_indices must be a sequence of stage numbers, got {out_indices!r}")
        super().__init__(norm_layer=norm_layer, **dict(kwargs, num_classes=0))
        n = len(self.layers)
        if any(not 0 <= i < n for i in out_indices) or not out_indices:
            raise ValueError(f"out_indices must be non-empty stage numbers in [0, {n}), got {list(out_indices)}")
        self.out_indices = sorted(set(out_indices))
        del self.classifier
        like = self.patch_embed[0].weight
        for i in self.out_indices:
            self.add_module(f"outnorm{i}", nn.LayerNorm(self.dims[i], device=like.device, dtype=like.dtype))
        self.feature_info = [self.feature_info[i] for i in self.out_indices]
        if pretrained:
            load_pretrained(self, pretrained)

    def forward(self, x: Tensor) -> List[Tensor]:
        x, outs = self.patch_embed(self._check_input(x)), []           # (B, C0, H/4, W/4)
        for i in range(self.out_indices[-1] + 1):
            x = self._stage(i, x)                                     # (B, C_i, H_i, W_i)
            if i in self.out_indices:
                out = getattr(self, f"outnorm{i}")(x.permute(0, 2, 3, 1))
                outs.append(out.permute(0, 3, 1, 2).contiguous())    # (B, C_i, H_i, W_i)
            x = self.layers[i].downsample(x)
        return outs

    def forward_features(self, x: Tensor) -> Tensor:
        raise TypeError("Backbone_VSSM has no classifier: call the backbone itself for its feature maps")

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        raise TypeError("Backbone_VSSM has no classifier head")


# --- Saving: what load_checkpoint_file reads back.
def save_weights(state_dict_or_model: Union[nn.Module, Dict[str, Any]], path: Union[str, os.PathLike]) -> None:
    """Save a state dict, or a module's, to ``path``: with torch.save, or as safetensors when the name ends in
    .safetensors (tensors only; written contiguous, on the CPU, tensors sharing storage as separate copies)."""
    state = state_dict_or_model.state_dict() if isinstance(state_dict_or_model, nn.Module) else state_dict_or_model
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        torch.save(state, path)
        return
    save_file = _safetensors("writing a .safetensors file").save_file
    tensors, storages = {}, set()
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{key!r} is a {type(value).__name__}; a .safetensors file holds only tensors")
        value = value.detach().cpu().contiguous()
        storage = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if storage in storages else value
        storages.add(storage)
    save_file(tensors, path, metadata={"format": "pt"})


# --- The model zoo: the nine ImageNet-1K models released by the authors.
_RELEASES = "https://github.com/MzeroMiko/VMamba/releases/download/"
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
# timm's weights-only loader refuses the released files (training state): ``custom_load`` uses VSSM.load_pretrained.
default_cfgs: Dict[str, Dict[str, Any]] = {name: dict(
    url=pretrained_url(name), custom_load=True, num_classes=1000, pool_size=(7, 7), first_conv="patch_embed.0",
    classifier="classifier.head", license="mit", paper_ids="arXiv:2401.10166",
    origin_url="https://github.com/MzeroMiko/VMamba", **EVAL_CONFIG) for name in _ZOO}


def _timm_entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        from timm.models import build_model_with_cfg
        return build_model_with_cfg(VSSM, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                    feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
                                    **dict(model_config(name), **kwargs))
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
    mmengine and, when installed, mmdet and mmseg, so the authors' configs build it. Idempotent."""
    if importlib.util.find_spec("mmengine") is None:
        raise ImportError("register_mm needs OpenMMLab's mmengine (and mmdet or mmseg for their pipelines): "
                          "pip install -U openmim && mim install mmengine mmdet mmsegmentation")
    for package in ("mmengine", "mmdet", "mmseg"):
        with contextlib.suppress(ImportError):
            importlib.import_module(f"{package}.registry").MODELS.register_module(
                name="MM_VSSM", module=Backbone_VSSM, force=True)
    return Backbone_VSSM


if "timm" in sys.modules and __name__ != "__main__":
    try:
        register_timm()
    except Exception as e:  # e.g. an old timm without these APIs
        warnings.warn(f"vmamba: the models are not registered with timm ({type(e).__name__}: {e})", stacklevel=2)


# --- Command line: ``python vmamba.py`` runs an offline smoke test of this file.
def _print_table(rows: List[Dict[str, Any]], columns: Sequence[str]) -> None:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    for r in [{c: c for c in columns}, *rows]:   # the header, then the rows
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)))


def _flops_table(shape: Sequence[int] = (3, 224, 224), names: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Params (M) and GFLOPs of zoo models beside the published GFLOPs, on the meta device; ``error`` at 224 px."""
    rows = []
    for name in names or list_models():
        with torch.device("meta"):
            model = create_model(name)
        gflops, published = model.flops(shape) / 1e9, _ZOO[name][3]
        rows.append(dict(model=name, params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                         gflops=round(gflops, 2), published_gflops=published,
                         error=f"{gflops / published - 1:+.1%}" if tuple(shape) == (3, 224, 224) else "-"))
    return rows


def _cmd_flops(args: argparse.Namespace) -> int:
    rows = _flops_table((3, args.size, args.size), args.model.split(",") if args.model else None)
    print(f"params and GFLOPs (multiply-adds) at {args.size}x{args.size}; scans count 9*L*D*N")
    _print_table(rows, ["model", "params_m", "gflops", "published_gflops", "error"])
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    checkpoint = load_checkpoint_file(download_cached(args.input) if _is_url(args.input) else args.input)
    for name in [args.model] if args.model else list_models():  # the architecture it fits exactly
        with torch.device("meta"):
            model = create_model(name)
        state, own = checkpoint_filter_fn(checkpoint, model), model.state_dict()
        if args.model:
            load_pretrained(model.to_empty(device="cpu"), state)  # raises, saying what does not fit
        if args.model or (state.keys() == own.keys() and all(state[k].shape == own[k].shape for k in own)):
            break
    else:
        raise ValueError("the checkpoint matches none of the zoo's architectures; pass --model "
                         f"(one of {list_models()}) to convert it against one")
    save_weights(state, args.output)
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
    p = commands.add_parser("flops", help="params and GFLOPs of the zoo beside the published table",
                            description="Params and GFLOPs (multiply-adds; 9*L*D*N per selective scan) "
                            "of zoo models, counted without weights or downloads.")
    p.add_argument("--model", default=None, help="comma-separated zoo names (default: all)")
    p.add_argument("--size", type=int, default=224, help="input resolution (default: 224)")
    p.set_defaults(run=_cmd_flops)
    p = commands.add_parser("convert", help="rewrite a checkpoint in this file's layout (.safetensors or .pth)",
                            description="Read a checkpoint in any released layout (file or URL) and write "
                            "its weights in the released key layout; .safetensors needs the safetensors package.")
    p.add_argument("input", help="checkpoint path or http(s) URL")
    p.add_argument("output", help="output path: .safetensors, or any other name for torch.save")
    p.add_argument("--model", default=None, help="zoo architecture (default: the one the checkpoint matches)")
    p.set_defaults(run=_cmd_convert)
    args = parser.parse_args(argv)
    return _smoke(args) if args.command is None else args.run(args)


if __name__ == "__main__":
    sys.exit(main())
