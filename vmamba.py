"""VMamba: Visual State Space Model, in one file.

Liu et al., "VMamba: Visual State Space Model", NeurIPS 2024 (arXiv:2401.10166).

A vision backbone that replaces attention with SS2D: every feature map is read as
four 1-D sequences (row-major, column-major and both reversed), each sequence goes
through a Mamba-1 selective scan, and the four results are summed back onto the
pixels. Cost grows linearly with the number of pixels.

This file needs only ``torch`` and ``einops``. It runs the released checkpoints
exactly, on CPU with a fast pure-PyTorch scan, and on CUDA with the compiled
``mamba_ssm`` kernel or Triton kernels when they are installed.

Usage::

    import vmamba
    model = vmamba.vmamba_tiny_s1l8(pretrained=True).eval()    # ImageNet-1K, 82.6% top-1
    logits = model(torch.randn(1, 3, 224, 224))                 # (1, 1000)

    backbone = vmamba.Backbone_VSSM(**vmamba.model_config("vmamba_tiny_s1l8"))
    features = backbone(torch.randn(1, 3, 512, 512))            # 4 maps, strides 4..32

    vmamba.load_pretrained(model, "https://host/ckpt.pth")      # any released layout

Run ``python vmamba.py`` for an offline smoke test, ``python vmamba.py --help`` for more.

License: MIT.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import contextlib
import csv
import ctypes
import dataclasses
import errno
import hashlib
import http.client
import importlib
import json
import math
import os
import pickle
import posixpath
import re
import statistics
import sys
import tarfile
import threading
import time
import types
import urllib.parse
import urllib.request
import uuid
import warnings
import zipfile
from collections import Counter, OrderedDict
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, _weights_only_unpickler
from torch.nn.modules import module as _nn_module

__all__ = [
    # kernels
    "selective_scan", "selective_scan_ref", "cross_scan", "cross_merge", "ss2d_core",
    "available_backends", "set_backend", "free_scan_buffers",
    # model
    "SS2D", "VSSBlock", "VSSM", "Backbone_VSSM",
    # checkpoints
    "load_pretrained", "checkpoint_filter_fn", "load_checkpoint_file", "download_cached",
    # zoo
    "list_models", "create_model", "model_config", "pretrained_url", "EVAL_CONFIG",
    "vanilla_vmamba_tiny", "vanilla_vmamba_small", "vanilla_vmamba_base", "vmamba_tiny_s2l5",
    "vmamba_small_s2l15", "vmamba_base_s2l15", "vmamba_tiny_s1l8", "vmamba_small_s1l20",
    "vmamba_base_s1l20",
    # ecosystem and analysis
    "register_timm", "register_mm", "stage_features", "effective_receptive_field", "erf_summary",
    "capture_scan_input", "ss2d_attention", "activation_maps", "measure_forward", "loglog_slope",
]

# ----------------------------------------------------------------------------------------
# Optional accelerated kernels. Each import is tried once; a missing one is never an error
# until somebody asks for that backend by name.

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except Exception:  # ImportError, or an "undefined symbol" OSError from a broken build
    _mamba_selective_scan_fn = None

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None
_HAS_TRITON = triton is not None

BACKENDS = ("auto", "torch", "triton", "mamba_ssm")
_INSTALL_HINTS = {
    "mamba_ssm": "pip install mamba-ssm --no-build-isolation (needs a CUDA toolkit matching torch)",
    "triton": "pip install triton (Linux; ships with the CUDA builds of torch)",
}
_forced_backend: Optional[str] = None


def _warn_once(message: str, _seen: set = set()) -> None:
    if message not in _seen:
        _seen.add(message)
        warnings.warn(message, stacklevel=3)


# ----------------------------------------------------------------------------------------
# Selective scan: the reference, the fast pure-PyTorch form, and the public dispatcher.


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                       delta_softplus: bool = True) -> Tensor:
    """Grouped Mamba-1 selective scan, one step at a time, in float64. The oracle.

    Shapes (K groups of D channels, state size N, length L)::

        u, delta    (B, K*D, L)     input and step size
        A           (K*D, N)        negative decay rates
        B, C        (B, K, N, L)    input and output projections, shared by a group
        D           (K*D,)          skip connection, optional
        delta_bias  (K*D,)          added to delta before softplus, optional

    Recurrence, with ``dt = softplus(delta + delta_bias)``::

        h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   h_0 = 0
        y_t = <C_t, h_t> + D * u_t

    Returns y as float64, (B, K*D, L). Slow (a Python loop over L): use it for tests.
    """
    batch, channels, length = u.shape
    groups = B.shape[1]
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    dt = F.softplus(delta) if delta_softplus else delta
    B = B.repeat_interleave(channels // groups, dim=1)                 # (B, K*D, N, L)
    C = C.repeat_interleave(channels // groups, dim=1)                 # (B, K*D, N, L)
    h = u.new_zeros(batch, channels, A.shape[1])                       # (B, K*D, N)
    ys = []
    for dt_t, u_t, b_t, c_t in zip(dt.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1)):
        h = torch.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * b_t
        ys.append((h * c_t).sum(-1))
    y = torch.stack(ys, dim=-1)                                        # (B, K*D, L)
    if D is not None:
        y = y + D.double()[:, None] * u
    return y



# ----------------------------------------------------------------------------------------
# The pure-PyTorch scan engine (backend "torch").
#
# Recurrence (per channel d, state n), computed in float32:
#     dt_t = softplus(delta_t + delta_bias)            (or delta_t + delta_bias)
#     h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   h_{-1} = 0
#     y_t  = <C_t, h_t> + D * u_t
#
# Engine. The sequence is split into nc chunks of T steps and stored time-major,
# (T, B, nc, ...), so one fused multiply-add advances every chunk by one step:
#   1. a local pass per chunk from a zero state gives each chunk's exit state;
#   2. a log-depth scan over chunks turns exit states into each chunk's entry carry
#      (chunk decays are exp(A * sum of dt), so nothing is ever divided by a decay);
#   3. a second pass per chunk, started from its carry, produces the states.
# The backward recomputes states from the stored entry carries and runs the adjoint
# recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} with the same machinery, time reversed.
# Work is split into blocks of batch rows and chunks so that each working tensor stays
# ~2M elements; blocks of one sequence run in order and hand their exit state on. When one
# step's state (B*G*N*D) is large, each block holds a single chunk of all batch rows and the
# blocks simply run in sequence (steps 1-2 are skipped). Decay arguments are floored at -80
# (see _EXP_FLOOR). The eager path works in place in reused buffers; traced calls (ONNX
# export) run a single block out of place.

_BLOCK_ELEMS = 1 << 21  # target size of one (T, b, n, G, N, D) working tensor (8 MB)
_SEQ_STATE = 16384  # per-step state (B*G*N*D) from which one chunk per block runs in sequence
_SEQ_CARRY = 64  # blocks of up to this many chunks pass carries chunk by chunk, not in log2 levels
_EXP_FLOOR = -80.0
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_SOFTPLUS_THRESHOLD = 20


# --- Layout helpers
def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _softplus(z: Tensor) -> Tensor:
    # F.softplus (threshold 20) is exact in float32 and the fastest option measured here.
    return F.softplus(z)


def _softplus_log2(z: Tensor, out: Tensor, zmax: Optional[float] = None) -> float:
    """out = softplus(z ln 2) (F.softplus, threshold 20) for z given in log2 units, as
    log1p(2^z): on CPU exp2 + log1p cost about three quarters of aten's softplus and equal
    it to float rounding. z may be a strided view, or out itself; zmax: max(z) if known (a
    reduction over a strided view is slow). Eager only. Returns max(out)."""
    zmax = float(z.max()) if zmax is None else zmax
    if zmax > _SOFTPLUS_THRESHOLD * _LOG2E:  # 2^z could overflow: aten's threshold keeps z there
        torch.ops.aten.softplus.out(z * _LN2, 1, _SOFTPLUS_THRESHOLD, out=out)
        return zmax * _LN2
    torch.exp2(z, out=out).log1p_()
    return math.log1p(2.0 ** zmax)


def _softplus_(z: Tensor) -> Tuple[Tensor, float]:
    """F.softplus in place on z (eager only). -> (z, max of the result)."""
    return z, _softplus_log2(z.mul_(_LOG2E), z)


def _sequential(state: int) -> bool:
    """Whether blocks hold one chunk each and run in sequence (no chunk carry pass): worth
    it once one step's state, state = B*G*N*D, is big enough to amortise per-op overhead."""
    return state >= _SEQ_STATE and not _tracing()


def _chunk_len(L: int, N: int, state: int) -> int:
    """Chunk length T: a single chunk for short sequences, else the T in a range that pads
    least (ties go to the longer chunk). Traced graphs use short chunks (the graph grows
    with T, the chunk carry scan only with log2(nc)); sequential blocks use long ones."""
    if _tracing():
        lo, hi = 8, 16
    elif _sequential(state):
        hi = min(256, max(16, _BLOCK_ELEMS // state))
        lo = max(8, hi // 2)
    elif N == 1:
        lo, hi = (7, 16) if L <= 1024 else (32, 64)   # short maps: fewer steps per chunk win
    else:
        lo, hi = 16, 24
    if L <= hi:
        return max(L, 1)
    return min(range(lo, hi + 1), key=lambda t: ((L + t - 1) // t * t, -t))


def _to_tm(seq: Tensor, T: int) -> Tensor:
    """(B, L, *rest) -> time-major (T, B, nc, *rest), zero-padded to nc*T (a strided view
    unless padded)."""
    bsz, L = seq.shape[:2]
    nc = (L + T - 1) // T  # ceil; positive operands trace to the same ONNX Div
    if nc * T != L:
        pad = seq.new_zeros((bsz, nc * T - L) + tuple(seq.shape[2:]))
        seq = torch.cat([seq, pad], 1)
    return seq.reshape((bsz, nc, T) + tuple(seq.shape[2:])).movedim(2, 0)


def _from_tm(x: Tensor, L: int) -> Tensor:
    """(T, B, nc, *rest) -> (B, L, *rest) (drops the padding)."""
    T, bsz, nc = x.shape[:3]
    return x.movedim(0, 2).reshape((bsz, nc * T) + tuple(x.shape[3:]))[:, :L]


Block = Tuple[int, int, int, int]


def _blocks(bsz: int, nc: int, per_chunk: int, state: int, reverse: bool) -> List[Block]:
    """Blocks (b0, b1, c0, c1) of batch rows and chunks of ~_BLOCK_ELEMS elements
    (per_chunk per row and chunk; state = per-step state of all rows), chunks in the
    scan's iteration order."""
    if _tracing():
        return [(0, bsz, 0, nc)]
    if _sequential(state):
        cs = [(c, c + 1) for c in range(nc)]
        return [(0, bsz, c0, c1) for c0, c1 in (cs[::-1] if reverse else cs)]
    n = max(1, _BLOCK_ELEMS // per_chunk)  # chunks per block
    if n >= nc:
        rows = n // nc
        return [(b, min(b + rows, bsz), 0, nc) for b in range(0, bsz, rows)]
    n = -(-nc // -(-nc // n))  # balance the chunk blocks
    cs = [(c, min(c + n, nc)) for c in range(0, nc, n)]
    if reverse:
        cs.reverse()
    return [(b, b + 1, c0, c1) for b in range(bsz) for c0, c1 in cs]


# ----------------------------------------------------------------------------
# Chunked scan machinery. Layouts (channels innermost, so broadcasts over N or over
# channels run on contiguous inner loops; chunks of a block along dim 1 of chunk tensors):
#   full tensors      (T, b, n, G, N, D)    a = exp(dt A), x = dt u B, states
#   per step / chunk  (b, n, G, N, D)
#   dt, u, y, dy      (T, b, n, G, D);   Bm, Cm (T, b, n, G, N);   A (G, N, D)
# "reverse" iterates t = T-1..0 and chunks last..first. "shift" uses the previous step's decay:
#   shift=False: s_t = a_t * s_prev + x_t     (the forward recurrence)
#   shift=True:  s_t = a_prev * s_prev + x_t  (its adjoint, run in the opposite order)
# ----------------------------------------------------------------------------
_WORKSPACE = threading.local()
_WORKSPACE_MAX_BYTES = 64 << 20  # per buffer; larger work tensors are allocated per call


def free_scan_buffers() -> None:
    """Release this thread's kept CPU work buffers.

    The torch scan and the MLP's inference path keep their CPU work buffers (up to 64 MB
    each, a few per thread) between calls, because fresh multi-megabyte allocations
    page-fault on every call. Call this to hand that memory back, e.g. after a burst of
    high-resolution inference."""
    _WORKSPACE.__dict__.clear()


class _Buffers:
    """Named float32 work buffers for the eager path. On CPU they persist per thread
    across calls (see free_scan_buffers); anything a caller returns or saves for backward
    must be computed out of them, never be a view of one."""

    def __init__(self, device: torch.device):
        self.device = device
        self.store: Dict[str, Tensor] = {}
        self.kept = (_WORKSPACE.__dict__.setdefault("buffers", {})
                     if device.type == "cpu" and not torch.compiler.is_compiling() else None)

    def get(self, name: str, shape) -> Tensor:
        n = math.prod(shape)
        store = self.kept if self.kept is not None and n * 4 <= _WORKSPACE_MAX_BYTES else self.store
        buf = store.get(name)
        if buf is None or buf.numel() < n:
            with torch.inference_mode(False):  # a normal tensor, usable in any later mode
                buf = store[name] = torch.empty(n, device=self.device)
        return buf[:n].view(shape)


def _kept_buffers_ok(x: Tensor, weight: Tensor, *modules: nn.Module) -> bool:
    """Whether a layer may compute a hidden tensor into a kept CPU work buffer: eager
    float32 inference (nothing records the graph or saves the tensor), no autocast, no
    hook on ``modules`` (see _inplace_ok)."""
    return (_inplace_ok(*modules) and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _inplace_ok(*modules: nn.Module) -> bool:
    """Whether a layer may overwrite its own intermediate tensors (saves a fresh
    allocation, which page-faults on CPU for multi-MB tensors): eager, without grad, and
    no forward hook on ``modules`` (the ones whose output would be overwritten or whose
    call is skipped) or on every module, which could hold on to that output."""
    if torch.is_grad_enabled() or _tracing():
        return False
    if getattr(_nn_module, "_global_forward_hooks", None) or getattr(_nn_module, "_global_forward_pre_hooks", None):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _mul(x: Tensor, y: Tensor, bufs: Optional[_Buffers], name: str) -> Tensor:
    """x * y, written into the work buffer `name` when bufs is given (eager path)."""
    if bufs is None:
        return x * y
    return torch.mul(x, y, out=bufs.get(name, _broadcast(x.shape, y.shape)))


def _broadcast(a: Sequence[int], b: Sequence[int]) -> Tuple[int, ...]:
    """Broadcast shape of two compatible shapes (torch.broadcast_shapes costs ~10x more)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return tuple(x if y == 1 else y for x, y in zip(a, b))


def _rate(A: Tensor, inplace: bool) -> Tensor:
    """The decay rate _decay expects: A in natural units (traced), or A * log2(e) (eager,
    where _decay uses exp2: 40% cheaper than exp on CPU, equal to float rounding)."""
    return A * _LOG2E if inplace else A


def _decay(z: Tensor, inplace: bool, clamp: bool = True) -> Tensor:
    """exp(max(z, _EXP_FLOOR)) for z = dt * _rate(A, inplace): exp2 in place on z when
    inplace, exp out of place otherwise. clamp=False when z is known to stay above the
    floor."""
    if inplace:
        return (z.clamp_(min=_EXP_FLOOR * _LOG2E) if clamp else z).exp2_()
    return torch.exp(z.clamp(min=_EXP_FLOOR) if clamp else z)


def _needs_clamp(dt: Tensor, A: Tensor, inplace: bool, dt_max: Optional[float] = None) -> bool:
    """Whether some dt * A may fall below _EXP_FLOOR (always assumed when tracing);
    dt_max: max(dt) when the caller knows it."""
    if not inplace:
        return True
    return (float(dt.max()) if dt_max is None else dt_max) * float(A.min()) < _EXP_FLOOR


def _contract_n(h: Tensor, C: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """sum_n C[..., n] * h[..., n, :]. h: (..., N, D); C: (..., N) -> (..., D), written
    into out when given."""
    if C.shape[-1] == 1:
        return h.squeeze(-2) * C if out is None else torch.mul(h.squeeze(-2), C, out=out)
    if out is None:
        return torch.matmul(C.unsqueeze(-2), h).squeeze(-2)
    torch.matmul(C.unsqueeze(-2), h, out=out.unsqueeze(-2))
    return out


def _order(T: int, reverse: bool) -> List[int]:
    return list(range(T - 1, -1, -1)) if reverse else list(range(T))


def _prev_chunk(x: Tensor, reverse: bool, first: Optional[Tensor] = None) -> Tensor:
    """Value of the previous chunk in iteration order along dim 1; the first chunk gets
    `first` (b, ...) or zero."""
    edge = torch.zeros_like(x[:, :1]) if first is None else first.unsqueeze(1)
    if reverse:
        return torch.cat([x[:, 1:], edge], 1)
    return torch.cat([edge, x[:, :-1]], 1)


def _chunk_windows(dt: Tensor, reverse: bool, shift: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Per chunk, the sum of dt over the decays applied across it, and (shift) the dt of
    the decay applied on entry. dt: (T, B, nc, G, D) -> (B, nc, G, D) each."""
    dsum = dt.sum(0)
    if not shift:
        return dsum, None
    last = dt[0] if reverse else dt[-1]
    # across chunk c: the previous chunk's last decay, then c's decays but its last
    dprev = _prev_chunk(last, reverse)
    return dsum - last + dprev, dprev


def _exit_states(As: Sequence[Tensor], xs: Sequence[Tensor], reverse: bool, shift: bool,
                 inplace: bool) -> Tensor:
    """Each chunk's final state from a zero entry state, from the step views (a.unbind(0),
    x.unbind(0): one call for all views, far cheaper than indexing per step).
    -> (b, n, G, N, D)."""
    ts = _order(len(xs), reverse)
    s = xs[ts[0]].clone() if inplace else xs[ts[0]]
    for p, t in zip(ts[:-1], ts[1:]):
        j = p if shift else t
        s = torch.addcmul(xs[t], As[j], s, out=s) if inplace else torch.addcmul(xs[t], As[j], s)
    return s


def _carry_scan(S: Tensor, P: Tensor, reverse: bool, need_q: bool) -> Tuple[Tensor, Tensor]:
    """Scan over chunks (dim 1): X_c = S_c + P_c * X_prev(c) from a zero start, chunk by
    chunk for few chunks, else in log2(n) vectorised levels. Also returns Q_c, the
    product of P from the block's first chunk through c (need_q; else None or partial)."""
    n = S.shape[1]
    if n <= _SEQ_CARRY and not _tracing():  # few chunks: n-1 small in-place steps beat log2(n) levels
        X, Q = S.clone(), P.clone() if need_q else None
        Xs, Ps, Qs = X.unbind(1), P.unbind(1), Q.unbind(1) if need_q else None
        for c in (range(n - 2, -1, -1) if reverse else range(1, n)):
            prev = c + 1 if reverse else c - 1
            Xs[c].addcmul_(Ps[c], Xs[prev])
            if need_q:
                Qs[c].mul_(Qs[prev])
        return X, Q
    X, Q = S, P
    s = 1
    while s < n:
        if reverse:
            X = torch.cat([torch.addcmul(X[:, :-s], Q[:, :-s], X[:, s:]), X[:, n - s:]], 1)
            if need_q or 2 * s < n:
                Q = torch.cat([Q[:, :-s] * Q[:, s:], Q[:, n - s:]], 1)
        else:
            X = torch.cat([X[:, :s], torch.addcmul(X[:, s:], Q[:, s:], X[:, :-s])], 1)
            if need_q or 2 * s < n:
                Q = torch.cat([Q[:, :s], Q[:, s:] * Q[:, :-s]], 1)
        s *= 2
    return X, Q


def _entry_carries(As: Sequence[Tensor], xs: Sequence[Tensor], P: Tensor, alpha: Tensor,
                   carry: Optional[Tensor], reverse: bool, shift: bool, inplace: bool,
                   into: Optional[Tensor] = None) -> Optional[Tensor]:
    """Term added to the first step of each chunk so that the chunked scan equals the
    global one. As, xs: step views of a, x (T, b, n, G, N, D); P (decay across each chunk),
    alpha (decay on entry): (b, n, G, N, D); carry: state before the block (b, G, N, D) or
    None for zero. -> (b, n, G, N, D); or with into (the first step's x), added into it
    in place (no term materialised) -> None."""
    single = xs[0].shape[1] == 1  # a single chunk: its entry state is the carry
    X = None
    if not single:
        X, Q = _carry_scan(_exit_states(As, xs, reverse, shift, inplace), P, reverse, carry is not None)
        if carry is not None:
            X = torch.addcmul(X, Q, carry.unsqueeze(1))
    if into is None:
        if single:
            return alpha * carry.unsqueeze(1) if carry is not None else torch.zeros_like(alpha)
        return alpha * _prev_chunk(X, reverse, carry)
    # the previous chunk's exit state enters each chunk through its first decay
    edge = -1 if reverse else 0
    if X is not None:
        cur, prev = (slice(None, -1), slice(1, None)) if reverse else (slice(1, None), slice(None, -1))
        into[:, cur].addcmul_(alpha[:, cur], X[:, prev])
    if carry is not None:
        into[:, edge].addcmul_(alpha[:, edge], carry)
    return None


def _exit_state(s: Tensor, reverse: bool) -> Tensor:
    """A block's final state (in iteration order) from its states (T, b, n, G, N, D),
    copied out of any reused buffer. -> (b, G, N, D)."""
    return (s[0][:, 0] if reverse else s[-1][:, -1]).clone()


def _scan_pass(As: Sequence[Tensor], x: Tensor, xs: Sequence[Tensor], E: Optional[Tensor], reverse: bool,
               shift: bool, inplace: bool) -> Tensor:
    """States of every step given the entry carries E (As, xs: step views of a and x; E
    None: already added into the first step). In place on x when inplace."""
    ts = _order(len(xs), reverse)
    pairs = list(zip(ts[:-1], ts[1:]))
    if inplace:
        if E is not None:
            xs[ts[0]].add_(E)
        for p, t in pairs:
            xs[t].addcmul_(As[p if shift else t], xs[p])
        return x
    outs = [xs[ts[0]] + E]
    for p, t in pairs:
        outs.append(torch.addcmul(xs[t], As[p if shift else t], outs[-1]))
    if reverse:
        outs.reverse()
    return torch.stack(outs)


def _block_fwd(dt: Tensor, u: Tensor, Bm: Tensor, Cm: Tensor, A: Tensor, dwin: Tensor,
               carry: Optional[Tensor], reverse: bool, bufs: Optional[_Buffers],
               clamp: bool, consume: bool = False, contract: bool = True, keep: bool = True,
               with_exit: bool = True) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """One block. dt, u: (T, b, n, G, D); Bm, Cm: (T, b, n, G, N); A: (G, N, D); dwin
    (b, n, G, D) from _chunk_windows; bufs: work buffers (eager, in place) or None
    (out of place, traceable); consume: dt and u may be overwritten (y goes into dt);
    contract=False (with consume and N=1): return the states h (in u) instead of y = C h;
    keep=False (needs bufs): no entry carries are returned; with_exit=False: no exit state.
    -> y (T, b, n, G, D) without the D term, entry carries (b, n, G, N, D), exit state
    (b, G, N, D)."""
    inplace = bufs is not None
    rate = _rate(A, inplace)
    a = _decay(_mul(dt.unsqueeze(-2), rate, bufs, "a"), inplace, clamp)  # (T, b, n, G, N, D)
    dtu = u.mul_(dt) if consume else dt * u
    if consume and Bm.shape[-1] == 1:
        x = dtu.mul_(Bm).unsqueeze(-2)
    else:
        x = _mul(dtu.unsqueeze(-2), Bm.unsqueeze(-1), bufs, "x")
    P = _decay(dwin.unsqueeze(-2) * rate, inplace)
    As, xs = a.unbind(0), x.unbind(0)
    first = -1 if reverse else 0
    E = _entry_carries(As, xs, P, As[first], carry, reverse, False, inplace, into=None if keep else xs[first])
    h = _scan_pass(As, x, xs, E, reverse, False, inplace)
    y = _contract_n(h, Cm, dt if consume else None) if contract else h.squeeze(-2)
    return y, E, _exit_state(h, reverse) if with_exit else None


def _block_bwd(dt: Tensor, u: Tensor, Bm: Tensor, Cm: Tensor, A: Tensor, E: Tensor, dy: Tensor,
               gwin: Tensor, gprev: Tensor, carry: Optional[Tensor], reverse: bool, bufs: _Buffers,
               clamp: bool):
    """Gradients for one block (shapes as _block_fwd; dy like y; gwin, gprev from
    _chunk_windows(shift=True); carry: adjoint state after the block).
    -> du, ddt (T, b, n, G, D); dB, dC (T, b, n, G, N); dA (G, N, D); adjoint exit state."""
    rate = _rate(A, True)
    a = _decay(_mul(dt.unsqueeze(-2), rate, bufs, "a"), True, clamp)  # (T, b, n, G, N, D)
    dtu = dt * u
    h = _mul(dtu.unsqueeze(-2), Bm.unsqueeze(-1), bufs, "h")
    As = a.unbind(0)
    h = _scan_pass(As, h, h.unbind(0), E, reverse, False, True)
    dC = _mul(h, dy.unsqueeze(-2), bufs, "t").sum(-1)
    g = _mul(dy.unsqueeze(-2), Cm.unsqueeze(-1), bufs, "g")  # becomes dL/dh_t after the adjoint scan
    P = _decay(gwin.unsqueeze(-2) * rate, True)
    alpha = _decay(gprev.unsqueeze(-2) * rate, True)
    gs = g.unbind(0)
    Eg = _entry_carries(As, gs, P, alpha, carry, not reverse, True, True)
    g = _scan_pass(As, g, gs, Eg, not reverse, True, True)
    carry = _exit_state(g, not reverse)
    gB = _contract_n(g, Bm)
    dB = _mul(g, dtu.unsqueeze(-2), bufs, "t").sum(-1)
    # r_t = g_t * a_t * h_prev(t); at each chunk's first step a * h_prev is exactly E
    if reverse:
        a[:-1].mul_(h[1:])
        a[-1].copy_(E)
    else:
        a[1:].mul_(h[:-1])
        a[0].copy_(E)
    r = a.mul_(g)
    ddt = torch.addcmul(_mul(r, A, bufs, "t").sum(-2), u, gB)
    dA = _mul(r, dt.unsqueeze(-2), bufs, "t").sum((0, 1, 2))
    return dt * gB, ddt, dB, dC, dA, carry


def _starts_sequence(blk: Block, nc: int, reverse: bool) -> bool:
    return blk[3] == nc if reverse else blk[2] == 0


def _scan_fwd(dt: Tensor, u: Tensor, Bm: Tensor, Cm: Tensor, A: Tensor, reverse: bool,
              inplace: bool, consume: bool = False, dt_max: Optional[float] = None,
              contract: bool = True, carries: bool = True) -> Tuple[Tensor, List[Tensor]]:
    """Chunked scan over time-major inputs. dt, u: (T, B, nc, G, D); Bm, Cm: (T, B, nc, G, N);
    A: (G, N, D); consume (with inplace): dt and u are scratch, y is written into dt;
    dt_max: max(dt) if known; contract=False (consume, N=1): return the states h, left
    in u, instead of y = C h; carries=False (inplace): no entry carries are kept (nothing
    will run the backward). -> y (T, B, nc, G, D) without the D term, entry carries of
    each block."""
    T, bsz, nc, G, D = dt.shape
    blocks = _blocks(bsz, nc, T * G * A.shape[1] * D, bsz * G * A.shape[1] * D, reverse)
    dwin, _ = _chunk_windows(dt, reverse, False)
    if not contract and not (consume and A.shape[1] == 1):
        raise ValueError("contract=False needs consume=True and N=1")
    y = (dt if contract else u) if consume else None if len(blocks) == 1 else dt.new_empty(dt.shape)
    Es, carry = [], None
    bufs = _Buffers(dt.device) if inplace else None
    clamp = _needs_clamp(dt, A, inplace, dt_max)
    keep = carries or not inplace  # the out-of-place (traced) path always materialises them
    for blk in blocks:
        b0, b1, c0, c1 = blk
        sl = (slice(None), slice(b0, b1), slice(c0, c1))
        carry = None if _starts_sequence(blk, nc, reverse) else carry
        ins = (dt, u, Bm, Cm, A, dwin) if len(blocks) == 1 else (dt[sl], u[sl], Bm[sl], Cm[sl], A, dwin[b0:b1, c0:c1])
        yb, E, carry = _block_fwd(*ins, carry, reverse, bufs, clamp, consume, contract, keep, len(blocks) > 1)
        if keep:
            Es.append(E)
        if y is None:
            y = yb
        elif not consume:
            y[sl].copy_(yb)
    return y, Es


def _scan_bwd(dt: Tensor, u: Tensor, Bm: Tensor, Cm: Tensor, A: Tensor, Es: List[Tensor], dy: Tensor,
              reverse: bool, out: Optional[_Buffers] = None,
              dt_max: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of _scan_fwd. -> du, ddt (T, B, nc, G, D); dB, dC (T, B, nc, G, N); dA (G, N, D).
    With out, du, ddt, dB and dC are its work buffers (the caller copies what it keeps)."""
    T, bsz, nc, G, D = dt.shape
    N = A.shape[1]
    blocks = _blocks(bsz, nc, T * G * N * D, bsz * G * N * D, reverse)
    gwin, gprev = _chunk_windows(dt, not reverse, True)
    if out is None:
        du, ddt = dt.new_empty(dt.shape), dt.new_empty(dt.shape)
        dB, dC = Bm.new_empty(Bm.shape), Bm.new_empty(Bm.shape)
    else:
        du, ddt = out.get("du", dt.shape), out.get("ddt", dt.shape)
        dB, dC = out.get("dB", Bm.shape), out.get("dC", Bm.shape)
    dA, carry = None, None
    bufs = _Buffers(dt.device)
    clamp = _needs_clamp(dt, A, True, dt_max)
    for blk, E in zip(reversed(blocks), reversed(Es)):  # the adjoint runs the other way
        b0, b1, c0, c1 = blk
        sl = (slice(None), slice(b0, b1), slice(c0, c1))
        carry = None if _starts_sequence(blk, nc, not reverse) else carry
        g = _block_bwd(dt[sl], u[sl], Bm[sl], Cm[sl], A, E, dy[sl], gwin[b0:b1, c0:c1], gprev[b0:b1, c0:c1],
                       carry, reverse, bufs, clamp)
        for buf, val in zip((du, ddt, dB, dC), g[:4]):
            buf[sl].copy_(val)
        dA = g[4] if dA is None else dA + g[4]
        carry = g[5]
    return du, ddt, dB, dC, dA


# --- Public layout: u, delta (B, KD, L); B, C (B, K, N, L)
def _prep_dt(delta: Tensor, delta_bias: Optional[Tensor], softplus: bool) -> Tuple[Tensor, Tensor]:
    z = delta.float()
    if delta_bias is not None:
        z = z + delta_bias.float()[:, None]
    return z, (_softplus(z) if softplus else z)


def _tm(t: Tensor, K: int, T: int) -> Tensor:
    """(B, K*c, L) or (B, K, c, L) -> contiguous float32 time-major (T, B, nc, K, c)."""
    bsz, L = t.shape[0], t.shape[-1]
    t = t.float().reshape(bsz, K, -1, L).permute(0, 3, 1, 2)  # (B, L, K, c)
    return _to_tm(t, T).contiguous()


def _untm(t: Tensor, L: int) -> Tensor:
    """(T, B, nc, K, c) -> (B, K*c, L)."""
    s = _from_tm(t, L)  # (B, L, K, c)
    return s.permute(0, 2, 3, 1).reshape(s.shape[0], -1, L)


def _ss_inputs(u, dt, A, Bm, Cm):
    """-> time-major dt, u (T, B, nc, K, Dg); Bm, Cm (T, B, nc, K, N); A (K, N, Dg)."""
    L = u.shape[-1]
    K, N = Bm.shape[1], A.shape[1]
    T = _chunk_len(L, N, u.shape[0] * u.shape[1] * N)
    return (_tm(dt, K, T), _tm(u, K, T), _tm(Bm, K, T), _tm(Cm, K, T),
            A.float().reshape(K, -1, N).transpose(1, 2).contiguous())


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, Bm, Cm, D, delta_bias, softplus):
        z, dt = _prep_dt(delta, delta_bias, softplus)
        uf = u.float()
        y, Es = _scan_fwd(*_ss_inputs(uf, dt, A, Bm, Cm), False, True)
        y = _untm(y, u.shape[-1])
        if D is not None:
            y = torch.addcmul(y, D.float()[:, None], uf)
        ctx.softplus = softplus
        ctx.save_for_backward(u, delta, A, Bm, Cm, D, delta_bias, *Es)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        u, delta, A, Bm, Cm, D, delta_bias = saved[:7]
        Es = list(saved[7:])
        z, dt = _prep_dt(delta, delta_bias, ctx.softplus)
        uf, dy = u.float(), dy.float()
        bsz, kd, L = u.shape
        K, N = Bm.shape[1], A.shape[1]
        dt_t, u_t, B_t, C_t, A3 = _ss_inputs(uf, dt, A, Bm, Cm)
        du, ddt, dB, dC, dA = _scan_bwd(dt_t, u_t, B_t, C_t, A3, Es, _tm(dy, K, dt_t.shape[0]), False)
        du, ddelta = _untm(du, L), _untm(ddt, L)
        if ctx.softplus:
            ddelta = ddelta * torch.sigmoid(z)
        dD = dbias = None
        if D is not None:
            du = torch.addcmul(du, D.float()[:, None], dy)
            dD = (dy * uf).sum((0, 2)).to(D.dtype)
        if delta_bias is not None:
            dbias = ddelta.sum((0, 2)).to(delta_bias.dtype)
        dA = dA.transpose(1, 2).reshape(kd, N)  # (K, N, Dg) -> (KD, N)
        return (du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype),
                _untm(dB, L).reshape(bsz, K, N, L).to(Bm.dtype), _untm(dC, L).reshape(bsz, K, N, L).to(Cm.dtype),
                dD, dbias, None)


def _selective_scan_torch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                         delta_softplus: bool = True) -> Tensor:
    """Chunked selective scan. u, delta: (B, K*D, L); A: (K*D, N); B, C: (B, K, N, L);
    D, delta_bias: (K*D,) or None. Returns float32 (B, K*D, L). Differentiable in all
    tensor inputs; traced (ONNX) calls take an out-of-place path."""
    inputs = (u, delta, A, B, C, D, delta_bias)
    if _needs_grad(*inputs) and not _tracing():
        return _SelectiveScanFn.apply(*inputs, delta_softplus)
    # Inference, or a traced graph (out of place): no autograd bookkeeping. Eagerly, the
    # scan runs in place in the time-major copies (y lands in dt's), cloned first where
    # the layout change left them sharing memory with the caller's tensors.
    uf = u.float()
    if _tracing():
        y = _scan_fwd(*_ss_inputs(uf, _prep_dt(delta, delta_bias, delta_softplus)[1], A, B, C), False, False)[0]
    else:
        # bias and softplus in place on the time-major copy of delta (no fresh full-size
        # tensor before it); padding steps, at the end, never reach a real output
        shared = {t.untyped_storage().data_ptr() for t in (u, delta)}
        dt_t, u_t, *rest = (t.clone() if t.untyped_storage().data_ptr() in shared else t
                            for t in _ss_inputs(uf, delta, A, B, C))
        if delta_bias is not None:
            dt_t.add_(delta_bias.float().view(dt_t.shape[-2:]))
        dt_t, dt_max = _softplus_(dt_t) if delta_softplus else (dt_t, None)
        y = _scan_fwd(dt_t, u_t, *rest, False, True, consume=True, dt_max=dt_max, carries=False)[0]
    y = _untm(y, u.shape[-1])
    return y if D is None else torch.addcmul(y, D.float()[:, None], uf)


# ----------------------------------------------------------------------------
# Fused SS2D: the four directions of a (B, H, W) map scanned as G=4 groups of one
# time-major tensor (T, B, nc, 4, X). Direction k visits the pixels in the order
# 0 row-major, 1 column-major, 2 and 3 their reverses; one index_select puts every
# direction's inputs in its own order (the reverses as flipped copies, so all four
# run forwards in one pass), and one more brings the outputs back to pixel order.
# Entry points: _ss2d_scan_torch (per-direction dt, B, C given in pixel order) and
# _SS2DProjFn / _ss2d_proj_forward (what ss2d_core runs: dt is projected in scan order).
# ----------------------------------------------------------------------------
class _SS2DIndex(NamedTuple):
    """Gather indices of the fused scan (see _ss2d_index)."""
    x: Tensor
    k: Tensor
    x_zero: Tensor
    merge: Tensor
    bags: Tensor


_SS2D_INDEX: Dict[Tuple, _SS2DIndex] = {}


def _ss2d_index(bsz: int, H: int, W: int, T: int, device: torch.device) -> _SS2DIndex:
    """Gather indices for the fused SS2D scan (cached per shape and device).

    x: rows of a (B*L, X) pixel tensor and k: rows of a (B*L*4, X) per-pixel,
    per-direction tensor, both in time-major (T, B, nc, 4) order; x_zero: x with the
    padding steps pointing at row B*L (a zero row the caller appends); merge: rows of the
    (T*B*nc*4, X) time-major result in (B, L, 4) pixel order; bags: offsets of merge's
    groups of four (one per pixel), for embedding_bag. Padding steps (sequence
    position >= L, at the end of every direction) repeat the last pixel: they come after
    every real step, so in the forward scan they never reach a real output."""
    key = (bsz, H, W, T, str(device))
    cached = _SS2D_INDEX.get(key)  # one lookup: another thread may clear the cache meanwhile
    if cached is not None:
        return cached
    with torch.inference_mode(False):  # normal tensors: the cache serves every later mode
        out = _make_ss2d_index(bsz, H, W, T, device)
    if not _tracing():
        if len(_SS2D_INDEX) >= 64:
            _SS2D_INDEX.clear()
        _SS2D_INDEX[key] = out
    return out


def _make_ss2d_index(bsz: int, H: int, W: int, T: int, device: torch.device) -> _SS2DIndex:
    L = H * W
    nc = (L + T - 1) // T  # ceil with positive operands: traced shapes export as ONNX Div, which truncates
    s = torch.arange(nc * T).clamp(max=L - 1)                          # sequence position
    r = L - 1 - s
    pix = torch.stack([s, (s % H) * W + s // H, r, (r % H) * W + r // H])   # (4, nc*T) -> pixel
    pix = pix.view(4, nc, T).permute(2, 1, 0).unsqueeze(1)             # (T, 1, nc, 4)
    rows = torch.arange(bsz).view(1, bsz, 1, 1) * L + pix              # (T, B, nc, 4)
    k = torch.arange(4)
    p = torch.arange(L)
    col = (p % W) * H + p // W                                         # pixel -> column-major position
    seq = torch.stack([p, col, L - 1 - p, L - 1 - col], 1)             # (L, 4): pixel -> sequence position
    b = torch.arange(bsz).view(bsz, 1, 1)
    merge = (((seq % T) * bsz + b) * nc + seq // T) * 4 + k           # (B, L, 4)
    pad = (torch.arange(nc * T) >= L).view(nc, T).t().reshape(T, 1, nc, 1)
    return _SS2DIndex(*(t.reshape(-1).to(device)
                        for t in (rows, rows * 4 + k, torch.where(pad, bsz * L, rows), merge,
                                  torch.arange(0, 4 * bsz * L, 4))))


def _select_rows(t: Tensor, idx: Tensor, bufs: Optional[_Buffers], name: str) -> Tensor:
    """Rows idx of t flattened to (-1, X), into the work buffer `name` when bufs is given."""
    t = t.reshape(-1, t.shape[-1])
    if bufs is None:
        return t.index_select(0, idx)
    return torch.index_select(t, 0, idx, out=bufs.get(name, (idx.numel(), t.shape[-1])))


def _gather_tm(t: Tensor, idx: Tensor, T: int, nc: int, bufs: Optional[_Buffers] = None,
               name: str = "") -> Tensor:
    """Rows of t ((B, H, W, X) pixels or (B, H, W, 4, X) per direction), flattened, picked
    by idx -> time-major (T, B, nc, 4, X)."""
    return _select_rows(t, idx, bufs, name).view(T, -1, nc, 4, t.shape[-1])


def _ss2d_prep(dts: Tensor, Bs: Tensor, Cs: Tensor, delta_bias: Optional[Tensor], softplus: bool,
               idx: _SS2DIndex, T: int, nc: int, bufs: Optional[_Buffers] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Pixel-order per-direction inputs -> time-major dt (after bias and softplus)
    (T, B, nc, 4, D) and Bm, Cm (T, B, nc, 4, N): fresh tensors, or with bufs, dt in the
    work buffer "dt", computed in place."""
    dt = _gather_tm(dts.float(), idx.k, T, nc, bufs, "dt")
    if delta_bias is not None:
        dt = dt + delta_bias.float() if bufs is None else dt.add_(delta_bias.float())
    if softplus:
        dt = _softplus(dt) if bufs is None else _softplus_(dt)[0]
    return dt, _gather_tm(Bs.float(), idx.k, T, nc), _gather_tm(Cs.float(), idx.k, T, nc)


def _to_pixels(t: Tensor, idx: _SS2DIndex, shape: Sequence[int], bufs: Optional[_Buffers] = None,
               name: str = "") -> Tensor:
    """Time-major (T, B, nc, 4, X) -> pixel order (B, H, W, 4, X) (drops the padding)."""
    return _select_rows(t, idx.merge, bufs, name).view(*shape[:3], 4, t.shape[-1])


def _merge(y: Tensor, idx: _SS2DIndex, shape: Sequence[int], bufs: Optional[_Buffers],
           weights: Optional[Tensor] = None) -> Tensor:
    """Sum over the four directions of time-major (T, B, nc, 4, X) rows at each pixel,
    each row times its entry in weights ((T, B, nc, 4) time-major) if given -> fresh
    (B, H, W, X). Eager: one embedding_bag (gather, weighting and sum in one pass, 3x
    cheaper than a gather and a sum); traced: a gather and a sum."""
    if bufs is None:
        if weights is not None:
            y = y * weights.unsqueeze(-1)
        return _to_pixels(y, idx, shape).sum(3)
    rows = y.reshape(-1, y.shape[-1])
    if weights is not None:
        weights = weights.reshape(-1).index_select(0, idx.merge)
    # the op behind F.embedding_bag (mode 0: sum), without its per-call argument checks
    out = torch.embedding_bag(rows, idx.merge, idx.bags, False, 0, False, weights, False)[0]
    return out.view(*shape[:3], rows.shape[-1])


def _ss2d_out(y: Tensor, x: Tensor, Ds: Optional[Tensor], idx: _SS2DIndex, bufs: Optional[_Buffers],
              weights: Optional[Tensor] = None) -> Tensor:
    """Sum of the four directions' time-major outputs per pixel (each row times its
    weight, if given), plus the D skip term (a fresh tensor)."""
    y = _merge(y, idx, x.shape, bufs, weights)
    return y if Ds is None else y.addcmul_(x.float(), Ds.float().sum(0))


def _ss2d_run(x: Tensor, dt: Tensor, Bm: Tensor, Cm: Tensor, A: Tensor, Ds: Optional[Tensor],
              idx: _SS2DIndex, bufs: Optional[_Buffers], dt_max: Optional[float] = None,
              carries: bool = True) -> Tuple[Tensor, List[Tensor]]:
    """The fused scan from time-major dt (T, B, nc, 4, D) (after softplus; dt_max its max
    if known), Bm, Cm (T, B, nc, 4, N) and pixel-order x (B, H, W, D); A (4, D, N).
    -> float32 y (B, H, W, D) and the scan's entry carries. With bufs (eager) dt is
    scratch: the scan runs in place and y lands in it, or for N=1 the states stay in
    the gathered u and C weights them in the merge; without (traced graphs) it runs out
    of place. carries=False: the entry carries are not kept (no backward will run)."""
    T, nc = dt.shape[0], dt.shape[2]
    u = _gather_tm(x.float(), idx.x, T, nc, bufs, "u")
    fuse_c = bufs is not None and Cm.shape[-1] == 1
    y, Es = _scan_fwd(dt, u, Bm, Cm, A.float().transpose(1, 2).contiguous(), False, bufs is not None,
                      consume=bufs is not None, dt_max=dt_max, contract=not fuse_c, carries=carries)
    return _ss2d_out(y, x, Ds, idx, bufs, Cm.squeeze(-1) if fuse_c else None), Es


def _ss2d_adjoint(x: Tensor, dt: Tensor, Bm: Tensor, Cm: Tensor, A: Tensor, Ds: Optional[Tensor],
                  Es: List[Tensor], dy: Tensor, idx: _SS2DIndex, bufs: _Buffers,
                  dt_max: Optional[float] = None):
    """Backward of _ss2d_run from recomputed dt, Bm, Cm and float32 dy (B, H, W, D).
    -> dx (B, H, W, D); ddt, dB, dC time-major in bufs (ddt before softplus'); dA (4, D, N);
    dDs (4, D) or None. All float32."""
    T, nc, D = dt.shape[0], dt.shape[2], x.shape[-1]
    u = _gather_tm(x.float(), idx.x, T, nc, bufs, "u")
    # dy in scan order, zero at the padding steps (they run last; their adjoint would
    # otherwise flow back into every real step)
    dy_t = _gather_tm(torch.cat([dy.reshape(-1, D), dy.new_zeros(1, D)]), idx.x_zero, T, nc, bufs, "dy")
    du, ddt, dB, dC, dA = _scan_bwd(dt, u, Bm, Cm, A.float().transpose(1, 2).contiguous(), Es, dy_t, False, bufs,
                                    dt_max)
    dx = _merge(du, idx, x.shape, bufs)
    dDs = None
    if Ds is not None:
        dx.addcmul_(dy, Ds.float().sum(0))
        dDs = (dy * x.float()).sum((0, 1, 2)).expand(4, D).contiguous()
    return dx, ddt, dB, dC, dA.transpose(1, 2), dDs


class _SS2DFn(torch.autograd.Function):
    """The fused scan with a hand-written backward: the adjoint scan on time-major data,
    gradients brought back to pixel order by the same gathers (every time-major row but
    the padding is exactly one pixel and direction), no scatter."""

    @staticmethod
    def forward(ctx, x, dts, A, Bs, Cs, Ds, delta_bias, softplus):
        T, nc = _ss2d_chunks(x, A.shape[-1])
        idx = _ss2d_index(x.shape[0], x.shape[1], x.shape[2], T, x.device)
        bufs = _Buffers(x.device)
        dt, Bm, Cm = _ss2d_prep(dts, Bs, Cs, delta_bias, softplus, idx, T, nc, bufs)
        y, Es = _ss2d_run(x, dt, Bm, Cm, A, Ds, idx, bufs)
        ctx.softplus, ctx.chunks = softplus, (T, nc)
        ctx.save_for_backward(x, dts, A, Bs, Cs, Ds, delta_bias, *Es)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, dts, A, Bs, Cs, Ds, delta_bias, *Es = ctx.saved_tensors
        T, nc = ctx.chunks
        idx = _ss2d_index(x.shape[0], x.shape[1], x.shape[2], T, x.device)
        bufs = _Buffers(x.device)
        dt, Bm, Cm = _ss2d_prep(dts, Bs, Cs, delta_bias, ctx.softplus, idx, T, nc, bufs)
        dx, ddt, dB, dC, dA, dDs = _ss2d_adjoint(x, dt, Bm, Cm, A, Ds, Es, dy.float(), idx, bufs)
        ddts = _to_pixels(ddt, idx, x.shape)                            # (B, H, W, 4, D)
        if ctx.softplus:
            z = dts.float() if delta_bias is None else dts.float() + delta_bias.float()
            ddts = ddts.mul_(torch.sigmoid(z))
        dbias = None if delta_bias is None else ddts.sum((0, 1, 2)).to(delta_bias.dtype)
        return (dx.to(x.dtype), ddts.to(dts.dtype), dA.to(A.dtype),
                _to_pixels(dB, idx, x.shape).to(Bs.dtype), _to_pixels(dC, idx, x.shape).to(Cs.dtype),
                None if Ds is None else dDs.to(Ds.dtype), dbias, None)


def _ss2d_dt(P: Tensor, dt_w: Tensor, dt_b: Tensor, bufs: _Buffers) -> Tuple[Tensor, float]:
    """dt = softplus(P[..., :R] @ dt_w[k].T + dt_b[k]) for each direction k, from the
    gathered projection rows P (T, B, nc, 4, R+2N), into scan order: one batched matmul
    over the directions (in log2 units, for _softplus_log2), whose transposed result the
    softplus writes into the buffer "dt" (T, B, nc, 4, D). -> (dt, max(dt))."""
    R, D = dt_w.shape[2], dt_w.shape[1]
    rows = P.numel() // (4 * P.shape[-1])
    Pr = bufs.get("Pr", (4, rows, R)).copy_(P.view(rows, 4, -1)[..., :R].transpose(0, 1))
    # z lives in the buffer the scan's decays use later: free again once dt is made
    z = torch.baddbmm((dt_b * _LOG2E).unsqueeze(1), Pr, (dt_w * _LOG2E).transpose(1, 2),
                      out=bufs.get("a", (4, rows, D)))
    dt = bufs.get("dt", P.shape[:-1] + (D,))
    return dt, _softplus_log2(z.transpose(0, 1), dt.view(rows, 4, D), float(z.max()))


def _ss2d_proj_prep(x: Tensor, proj: Tensor, dt_w: Tensor, dt_b: Tensor, N: int,
                    bufs: _Buffers) -> Tuple[_SS2DIndex, Tensor, Tensor, float]:
    """Indices, gathered projection rows P (T, B, nc, 4, R+2N), dt (buffer "dt") and
    max(dt)."""
    T, nc = _ss2d_chunks(x, N)
    idx = _ss2d_index(x.shape[0], x.shape[1], x.shape[2], T, x.device)
    P = _gather_tm(proj, idx.k, T, nc)
    return (idx, P, *_ss2d_dt(P, dt_w, dt_b, bufs))


def _ss2d_proj_forward(x: Tensor, proj: Tensor, dt_w: Tensor, dt_b: Tensor, A: Tensor, Ds: Tensor,
                       bufs: _Buffers, carries: bool = True) -> Tuple[Tensor, List[Tensor]]:
    """Fused SS2D from the per-pixel projections proj (B, H, W, 4, R+2N) (float32).
    -> y (B, H, W, D) and the scan's entry carries."""
    N, R = A.shape[-1], dt_w.shape[2]
    idx, P, dt, dt_max = _ss2d_proj_prep(x, proj, dt_w, dt_b, N, bufs)
    return _ss2d_run(x, dt, P[..., R:R + N], P[..., R + N:], A, Ds, idx, bufs, dt_max, carries)


class _SS2DProjFn(torch.autograd.Function):
    """SS2D from x and its per-pixel projections, dt projection included, so the wide
    per-direction dt only ever exists in scan order inside work buffers. Inputs in
    float32: x (B, H, W, D), proj (B, H, W, 4, R+2N), dt_w (4, D, R), dt_b (4, D),
    A (4, D, N), Ds (4, D)."""

    @staticmethod
    def forward(ctx, x, proj, dt_w, dt_b, A, Ds):
        y, Es = _ss2d_proj_forward(x, proj, dt_w, dt_b, A, Ds, _Buffers(x.device))
        ctx.save_for_backward(x, proj, dt_w, dt_b, A, Ds, *Es)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, proj, dt_w, dt_b, A, Ds, *Es = ctx.saved_tensors
        D, N, R = x.shape[-1], A.shape[-1], dt_w.shape[2]
        bufs = _Buffers(x.device)
        idx, P, dt, dt_max = _ss2d_proj_prep(x, proj, dt_w, dt_b, N, bufs)
        dx, ddt, dB, dC, dA, dDs = _ss2d_adjoint(x, dt, P[..., R:R + N], P[..., R + N:], A, Ds, Es,
                                                 dy.float(), idx, bufs, dt_max)
        ddt.mul_(dt.neg_().expm1_().neg_())          # softplus' = sigmoid(z) = 1 - exp(-softplus(z))
        gP = torch.empty_like(P)                      # gradient of the gathered projection rows
        gPm, ddtm, Pm = gP.view(-1, 4, R + 2 * N), ddt.view(-1, 4, D), P.view(-1, 4, R + 2 * N)
        d_w = torch.empty_like(dt_w)
        for k in range(4):
            torch.mm(ddtm[:, k], dt_w[k], out=gPm[:, k, :R])
            torch.mm(ddtm[:, k].t(), Pm[:, k, :R], out=d_w[k])
        gP[..., R:R + N].copy_(dB)
        gP[..., R + N:].copy_(dC)
        return dx, _to_pixels(gP, idx, x.shape), d_w, ddt.sum((0, 1, 2)), dA, dDs


def _ss2d_chunks(x: Tensor, N: int) -> Tuple[int, int]:
    """Chunk length T and chunk count nc of the fused scan for a (B, H, W, D) map."""
    bsz, H, W, D = x.shape
    T = _chunk_len(H * W, N, bsz * 4 * N * D)
    return T, (H * W + T - 1) // T


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _ss2d_scan_torch(x: Tensor, dts: Tensor, A: Tensor, Bs: Tensor, Cs: Tensor,
                    Ds: Optional[Tensor], delta_bias: Optional[Tensor],
                    delta_softplus: bool = True) -> Tensor:
    """Fused cross-scan + 4-direction selective scan + cross-merge.
    x: (B, H, W, D); dts: (B, H, W, 4, D); Bs, Cs: (B, H, W, 4, N) (pixel order);
    A: (4, D, N); Ds, delta_bias: (4, D) or None. Direction k: 0 row-major, 1 column-major,
    2 and 3 their reverses. Returns float32 (B, H, W, D): the sum of the four scans'
    outputs at each pixel."""
    if not _tracing() and _needs_grad(x, dts, A, Bs, Cs, Ds, delta_bias):
        return _SS2DFn.apply(x, dts, A, Bs, Cs, Ds, delta_bias, delta_softplus)
    T, nc = _ss2d_chunks(x, A.shape[-1])
    idx = _ss2d_index(x.shape[0], x.shape[1], x.shape[2], T, x.device)
    bufs = None if _tracing() else _Buffers(x.device)
    dt, Bm, Cm = _ss2d_prep(dts, Bs, Cs, delta_bias, delta_softplus, idx, T, nc, bufs)
    return _ss2d_run(x, dt, Bm, Cm, A, Ds, idx, bufs, carries=False)[0]


# ----------------------------------------------------------------------------------------
# Triton kernels: the selective scan and the cross-scan/merge on CUDA with nothing to
# compile ahead of time. On CPU they run under TRITON_INTERPRET=1 (set before import),
# which is how they are tested without a GPU. Wrapped as torch custom ops with fake
# implementations and registered autograd, so torch.compile traces through them.

# Custom-op namespace; per module name, so "python vmamba.py" and "import vmamba" can coexist.
_OPS_NS = "vmamba_" + re.sub(r"\W", "_", __name__)


def _require_triton():
    if not _HAS_TRITON:
        raise RuntimeError(f"backend 'triton' is not available; install it with: {_INSTALL_HINTS['triton']}")


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _scan_blocks(D: int, N: int, L: int) -> Tuple[int, int, int]:
    """Tile sizes (BLOCK_D, BLOCK_N, BLOCK_L) of the selective-scan kernels.

    One program owns BLOCK_D channels of one group and walks L in chunks of BLOCK_L; its
    working tile is BLOCK_D * BLOCK_N * BLOCK_L float32 values (about 2048). This is the
    single place to tune for a GPU; forward and backward must agree on BLOCK_L because the
    forward stores one state per chunk for the backward.
    """
    block_n = _next_pow2(N)
    block_d = min(_next_pow2(D), max(2, 32 // block_n))
    block_l = max(16, min(_next_pow2(L), 2048 // (block_d * block_n)))
    return block_d, block_n, block_l


if triton is not None:

    @triton.jit
    def _affine_combine(a1, b1, a2, b2):
        """Compose two steps of h -> a*h + b: first (a1, b1), then (a2, b2)."""
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _affine_combine_excl(a1, b1, ea1, eb1, a2, b2, ea2, eb2):
        """Like _affine_combine, but a segment also carries its *exclusive* map (ea, eb): the
        composition of all its steps except the last one. A leaf is (a, b, 1, 0).

        The exclusive map of "left then right" is all of left followed by right's exclusive
        part. Scanning with this combine yields, at every position, both the inclusive
        prefix (h_t) and the exclusive prefix (h_{t-1}) without shifting registers or
        dividing by a (which may underflow to 0)."""
        return a1 * a2, a2 * b1 + b2, a1 * ea2, ea2 * b1 + eb2

    @triton.jit
    def _softplus_tl(z):
        """log(1 + exp(z)) in float32, linear above 20 and without log(1+x) cancellation
        for very negative z."""
        ez = tl.exp(tl.minimum(z, 20.0))
        small = ez - 0.5 * ez * ez + ez * ez * ez / 3.0  # log1p series, |error| < ez^4/4
        return tl.where(z > 20.0, z, tl.where(ez < 1e-3, small, tl.log(1.0 + ez)))

    # reverse_mask is never specialized: a constexpr 1 would break `reverse_mask >> k`.
    @triton.jit(do_not_specialize=["reverse_mask"])
    def _scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, Dskip_ptr, bias_ptr,
        y_ptr, states_ptr,
        L, N, D, K, n_chunks, reverse_mask,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        """Selective-scan forward. Grid: (batch * K, cdiv(D, BLOCK_D)).

        Contiguous inputs: u, delta (B, K*D, L) any float dtype; A (K*D, N); B, C (B, K, N, L);
        Dskip, bias (K*D,). Outputs: y (B, K*D, L) float32; states (B, K*D, n_chunks, N)
        float32, the state *before* each chunk (processing order), kept for the backward.

        Group k is reversed when bit k of reverse_mask is set: processing step s then reads
        memory position L-1-s, so y = flip(scan(flip(inputs))) without flipping in memory.

        Per chunk of BLOCK_L steps the recurrence h_s = a_s * h_{s-1} + b_s, with
        a_s = exp(dt_s * A) and b_s = dt_s * B_s * u_s, is an associative scan over the
        affine maps (a_s, b_s); the state at the chunk start is the carry (in registers):
        h_s = (a_{s0}...a_s) * h_{s0-1} + scan_b_s.
        """
        pid_bk = tl.program_id(0)
        pid_d = tl.program_id(1)
        b = pid_bk // K
        k = pid_bk % K
        rev = ((reverse_mask >> k) & 1) != 0

        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        offs_l = tl.arange(0, BLOCK_L)
        d_mask = offs_d < D
        n_mask = offs_n < N
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
        st_ptrs = states_ptr + (b * K * D + chan)[:, None].to(tl.int64) * n_chunks * N + offs_n[None, :]
        is_last = (offs_l == BLOCK_L - 1)[None, None, :]

        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for c in range(n_chunks):
            s = c * BLOCK_L + offs_l                            # processing steps
            s_mask = s < L
            pos = tl.where(s_mask, tl.where(rev, L - 1 - s, s), 0)  # memory positions
            dl_mask = d_mask[:, None] & s_mask[None, :]
            nl_mask = n_mask[:, None] & s_mask[None, :]

            tl.store(st_ptrs + c * N, h, mask=dn_mask)

            u = tl.load(u_ptr + row[:, None] + pos[None, :], mask=dl_mask, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + row[:, None] + pos[None, :], mask=dl_mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias[:, None]
            if SOFTPLUS:
                dt = _softplus_tl(dt)
            dt = tl.where(dl_mask, dt, 0.0)                     # padded steps: identity map
            Bv = tl.load(B_ptr + bc_row[:, None] + pos[None, :], mask=nl_mask, other=0.0).to(tl.float32)
            Cv = tl.load(C_ptr + bc_row[:, None] + pos[None, :], mask=nl_mask, other=0.0).to(tl.float32)

            a = tl.exp(dt[:, None, :] * A[:, :, None])           # (BD, BN, BL)
            bx = (dt * u)[:, None, :] * Bv[None, :, :]          # (BD, BN, BL)
            pa, pb = tl.associative_scan((a, bx), axis=2, combine_fn=_affine_combine)
            hs = pa * h[:, :, None] + pb                        # h_s for every step of the chunk

            y = tl.sum(hs * Cv[None, :, :], axis=1)             # (BD, BL)
            if HAS_D:
                y += Dskip[:, None] * u
            tl.store(y_ptr + row[:, None] + pos[None, :], y, mask=dl_mask)

            # Padded tail steps are identities, so the last column is the state after the chunk.
            h = tl.sum(tl.where(is_last, hs, 0.0), axis=2)

    # reverse_mask is never specialized: a constexpr 1 would break `reverse_mask >> k`.
    @triton.jit(do_not_specialize=["reverse_mask"])
    def _scan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, Dskip_ptr, bias_ptr, dy_ptr, states_ptr,
        du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
        L, N, D, K, n_chunks, reverse_mask,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        """Selective-scan backward. Grid and inputs as _scan_fwd_kernel, plus dy (B, K*D, L)
        float32 and the forward's chunk states.

        Outputs (float32, contiguous): du, ddelta (B, K*D, L); dB, dC (B, K, N, L), zeroed
        by the caller and accumulated with atomic adds across the channel blocks of a
        group; per-batch partials dA (B, K*D, N), dD and dbias (B, K*D), summed by the caller.

        Chunks are visited last to first. Each chunk recomputes h_{s-1} and h_s from its
        stored start state, then runs the adjoint recurrence backwards in time. With
        q_s = dL/dh_s and p_s = a_s * q_s (the part of q_s flowing into h_{s-1}):
            p_s = a_s * (C_s dy_s + p_{s+1}),   q_s = C_s dy_s + p_{s+1},
        a reverse affine scan over the leaves (a_s, a_s C_s dy_s) whose exclusive prefix is
        p_{s+1}; the carry between chunks is p at the chunk's first step. Then
            dL/db_s = q_s,  dL/d(dt_s A) = q_s a_s h_{s-1},  dL/dC_s = dy_s h_s.
        """
        pid_bk = tl.program_id(0)
        pid_d = tl.program_id(1)
        b = pid_bk // K
        k = pid_bk % K
        rev = ((reverse_mask >> k) & 1) != 0

        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        offs_l = tl.arange(0, BLOCK_L)
        d_mask = offs_d < D
        n_mask = offs_n < N
        chan = k * D + offs_d
        dn_mask = d_mask[:, None] & n_mask[None, :]

        A = tl.load(A_ptr + chan[:, None] * N + offs_n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
        if HAS_D:
            Dskip = tl.load(Dskip_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)

        row = (b * K * D + chan).to(tl.int64) * L
        bc_row = ((b * K + k) * N + offs_n).to(tl.int64) * L
        st_ptrs = states_ptr + (b * K * D + chan)[:, None].to(tl.int64) * n_chunks * N + offs_n[None, :]
        is_first = (offs_l == 0)[None, None, :]
        ones = tl.full((BLOCK_D, BLOCK_N, BLOCK_L), 1.0, tl.float32)
        zeros = tl.zeros((BLOCK_D, BLOCK_N, BLOCK_L), dtype=tl.float32)

        p = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)      # p at the step after this chunk
        dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i in range(n_chunks):
            c = n_chunks - 1 - i
            s = c * BLOCK_L + offs_l
            s_mask = s < L
            pos = tl.where(s_mask, tl.where(rev, L - 1 - s, s), 0)
            dl_mask = d_mask[:, None] & s_mask[None, :]
            nl_mask = n_mask[:, None] & s_mask[None, :]
            offs_dl = row[:, None] + pos[None, :]
            offs_nl = bc_row[:, None] + pos[None, :]

            u = tl.load(u_ptr + offs_dl, mask=dl_mask, other=0.0).to(tl.float32)
            z = tl.load(delta_ptr + offs_dl, mask=dl_mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                z += bias[:, None]
            if SOFTPLUS:
                dt = _softplus_tl(z)
            else:
                dt = z
            dt = tl.where(dl_mask, dt, 0.0)
            Bv = tl.load(B_ptr + offs_nl, mask=nl_mask, other=0.0).to(tl.float32)
            Cv = tl.load(C_ptr + offs_nl, mask=nl_mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs_dl, mask=dl_mask, other=0.0).to(tl.float32)

            # Recompute the forward states of this chunk: h_{s-1} from the exclusive prefix.
            h0 = tl.load(st_ptrs + c * N, mask=dn_mask, other=0.0)
            a = tl.exp(dt[:, None, :] * A[:, :, None])          # (BD, BN, BL)
            bx = (dt * u)[:, None, :] * Bv[None, :, :]
            _, _, ea, eb = tl.associative_scan((a, bx, ones, zeros), axis=2,
                                               combine_fn=_affine_combine_excl)
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
            if SOFTPLUS:
                ddelta = ddt * tl.sigmoid(z)
            else:
                ddelta = ddt
            if HAS_BIAS:
                dbias_acc += tl.sum(tl.where(dl_mask, ddelta, 0.0), axis=1)
            tl.store(du_ptr + offs_dl, du, mask=dl_mask)
            tl.store(ddelta_ptr + offs_dl, ddelta, mask=dl_mask)

            # B and C are shared by the group's channels: reduce this block, add atomically.
            dB = tl.sum(q * (dt * u)[:, None, :], axis=0)        # (BN, BL)
            dC = tl.sum(hs * dy[:, None, :], axis=0)
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
        """Cross-scan (MERGE=False) or cross-merge (MERGE=True). Grid: (batch * C, cdiv(H*W, BLOCK)).

        For pixel p = h*W + w (row-major) and its column-major index t = w*H + h, the four
        sequences hold that pixel at positions p, t, L-1-p, L-1-t (k = 0..3).
        Scan:  src x (B, C, H, W) -> dst (B, 4, C, L), each pixel read once, written 4 times.
        Merge: src ys (B, 4, C, L) -> dst (B, C, H, W), sum of the 4 entries in float32.
        Both contiguous; dst has the dtype of src.
        """
        pid_bc = tl.program_id(0)
        pid_l = tl.program_id(1)
        L = H * W
        b = pid_bc // C
        ch = pid_bc % C
        p = pid_l * BLOCK + tl.arange(0, BLOCK)
        mask = p < L
        t = (p % W) * H + p // W
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


# --- Selective scan: custom ops and autograd

def _scan_shapes(u, A, Bs):
    Bsz, KD, L = u.shape
    K, N = Bs.shape[1], A.shape[1]
    if KD % K != 0:
        raise ValueError(f"K*D={KD} is not a multiple of K={K}")
    return Bsz, K, KD // K, N, L


@torch.library.custom_op(f"{_OPS_NS}::selective_scan_fwd", mutates_args=())
def _selective_scan_fwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bs: torch.Tensor, Cs: torch.Tensor,
    Ds: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
    delta_softplus: bool, reverse_mask: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns y (B, K*D, L) float32 and the chunk-start states (B, K*D, n_chunks, N) float32."""
    _require_triton()
    Bsz, K, D, N, L = _scan_shapes(u, A, Bs)
    if tuple(Bs.shape) != (Bsz, K, N, L) or tuple(Cs.shape) != (Bsz, K, N, L):
        raise ValueError(f"B and C must be (batch, K, N, L) = {(Bsz, K, N, L)}, got "
                         f"{tuple(Bs.shape)} and {tuple(Cs.shape)}")
    block_d, block_n, block_l = _scan_blocks(D, N, L)
    n_chunks = triton.cdiv(L, block_l)
    y = torch.empty((Bsz, K * D, L), device=u.device, dtype=torch.float32)
    states = torch.empty((Bsz, K * D, n_chunks, N), device=u.device, dtype=torch.float32)
    u, delta, A, Bs, Cs = (t.contiguous() for t in (u, delta, A, Bs, Cs))
    # Absent optional inputs get a dummy pointer; the kernel never reads it (HAS_* = False).
    Dp = Ds.contiguous() if Ds is not None else u
    biasp = delta_bias.contiguous() if delta_bias is not None else u
    grid = (Bsz * K, triton.cdiv(D, block_d))
    _scan_fwd_kernel[grid](
        u, delta, A, Bs, Cs, Dp, biasp, y, states,
        L, N, D, K, n_chunks, reverse_mask,
        HAS_D=Ds is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l, num_warps=4,
    )
    return y, states


@_selective_scan_fwd.register_fake
def _(u, delta, A, Bs, Cs, Ds, delta_bias, delta_softplus, reverse_mask):
    Bsz, K, D, N, L = _scan_shapes(u, A, Bs)
    n_chunks = -(-L // _scan_blocks(D, N, L)[2])
    return (u.new_empty((Bsz, K * D, L), dtype=torch.float32),
            u.new_empty((Bsz, K * D, n_chunks, N), dtype=torch.float32))


@torch.library.custom_op(f"{_OPS_NS}::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd(
    dy: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bs: torch.Tensor,
    Cs: torch.Tensor, Ds: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
    states: torch.Tensor, delta_softplus: bool, reverse_mask: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """Returns (du, ddelta, dA, dB, dC, dD, ddelta_bias), each in its input's dtype; dD and
    ddelta_bias are (K*D,) float32 zeros when the input is absent."""
    _require_triton()
    Bsz, K, D, N, L = _scan_shapes(u, A, Bs)
    block_d, block_n, block_l = _scan_blocks(D, N, L)
    n_chunks = states.shape[2]
    dev, f32 = u.device, torch.float32
    dy, u, delta, A, Bs, Cs = (t.contiguous() for t in (dy, u, delta, A, Bs, Cs))
    Dp = Ds.contiguous() if Ds is not None else u
    biasp = delta_bias.contiguous() if delta_bias is not None else u
    du = torch.empty((Bsz, K * D, L), device=dev, dtype=f32)
    ddelta = torch.empty((Bsz, K * D, L), device=dev, dtype=f32)
    dB = torch.zeros((Bsz, K, N, L), device=dev, dtype=f32)     # atomic accumulation targets
    dC = torch.zeros((Bsz, K, N, L), device=dev, dtype=f32)
    dA = torch.zeros((Bsz, K * D, N), device=dev, dtype=f32)    # per-batch partials
    dD = torch.zeros((Bsz, K * D), device=dev, dtype=f32)
    dbias = torch.zeros((Bsz, K * D), device=dev, dtype=f32)
    grid = (Bsz * K, triton.cdiv(D, block_d))
    _scan_bwd_kernel[grid](
        u, delta, A, Bs, Cs, Dp, biasp, dy, states,
        du, ddelta, dA, dB, dC, dD, dbias,
        L, N, D, K, n_chunks, reverse_mask,
        HAS_D=Ds is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l, num_warps=4,
    )
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(A.dtype), dB.to(Bs.dtype),
            dC.to(Cs.dtype), dD.sum(0).to(Ds.dtype if Ds is not None else f32),
            dbias.sum(0).to(delta_bias.dtype if delta_bias is not None else f32))


@_selective_scan_bwd.register_fake
def _(dy, u, delta, A, Bs, Cs, Ds, delta_bias, states, delta_softplus, reverse_mask):
    KD = u.shape[1]
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A),
            torch.empty_like(Bs), torch.empty_like(Cs),
            u.new_empty((KD,), dtype=Ds.dtype if Ds is not None else torch.float32),
            u.new_empty((KD,), dtype=delta_bias.dtype if delta_bias is not None else torch.float32))


def _selective_scan_setup_context(ctx, inputs, output):
    u, delta, A, Bs, Cs, Ds, delta_bias, delta_softplus, reverse_mask = inputs
    ctx.save_for_backward(u, delta, A, Bs, Cs, Ds, delta_bias, output[1])
    ctx.delta_softplus = delta_softplus
    ctx.reverse_mask = reverse_mask
    ctx.mark_non_differentiable(output[1])


def _selective_scan_backward(ctx, dy, dstates):
    u, delta, A, Bs, Cs, Ds, delta_bias, states = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dbias = _selective_scan_bwd(
        dy, u, delta, A, Bs, Cs, Ds, delta_bias, states, ctx.delta_softplus, ctx.reverse_mask)
    return (du, ddelta, dA, dB, dC,
            dD if Ds is not None else None, dbias if delta_bias is not None else None, None, None)


_selective_scan_fwd.register_autograd(_selective_scan_backward,
                                      setup_context=_selective_scan_setup_context)


def _selective_scan_triton(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True,
                          reverse: Optional[Sequence[bool]] = None):
    """Grouped Mamba-1 selective scan, as :func:`selective_scan_ref` defines it.

    u, delta: (batch, K*D, L); A: (K*D, N), N <= 16 recommended; B, C: (batch, K, N, L),
    shared by the D channels of group k (channel c is in group c // D); D, delta_bias: (K*D,)
    or None. Any float dtype; computed in float32.
    reverse: optional sequence of K bools; a flagged group is scanned from L-1 down to 0,
    i.e. its output is flip(scan(flip(inputs))) along L.
    Returns y: (batch, K*D, L) float32. Differentiable in all tensor inputs.
    """
    mask = 0
    if reverse is not None:
        if len(reverse) != B.shape[1]:
            raise ValueError(f"reverse has {len(reverse)} flags for K={B.shape[1]} groups")
        mask = sum(1 << k for k, flag in enumerate(reverse) if flag)
    y, _ = _selective_scan_fwd(
        u, delta, A, B, C, D, delta_bias, bool(delta_softplus), mask)
    return y


# --- Cross-scan / cross-merge: custom ops, each the other's backward

def _cross_launch(src, dst, Bsz, C, H, W, merge):
    _require_triton()
    L = H * W
    block = min(1024, _next_pow2(L))
    _cross_kernel[(Bsz * C, triton.cdiv(L, block))](
        src, dst, C, H, W, C * L, MERGE=merge, BLOCK=block, num_warps=4)
    return dst


@torch.library.custom_op(f"{_OPS_NS}::cross_scan", mutates_args=())
def _cross_scan(x: torch.Tensor) -> torch.Tensor:
    Bsz, C, H, W = x.shape
    out = torch.empty((Bsz, 4, C, H * W), device=x.device, dtype=x.dtype)
    return _cross_launch(x.contiguous(), out, Bsz, C, H, W, merge=False)


@_cross_scan.register_fake
def _(x):
    Bsz, C, H, W = x.shape
    return x.new_empty((Bsz, 4, C, H * W))


@torch.library.custom_op(f"{_OPS_NS}::cross_merge", mutates_args=())
def _cross_merge(ys: torch.Tensor) -> torch.Tensor:
    Bsz, four, C, H, W = ys.shape
    out = torch.empty((Bsz, C, H, W), device=ys.device, dtype=ys.dtype)
    return _cross_launch(ys.contiguous(), out, Bsz, C, H, W, merge=True)


@_cross_merge.register_fake
def _(ys):
    Bsz, four, C, H, W = ys.shape
    return ys.new_empty((Bsz, C, H, W))


def _save_hw(ctx, inputs, output):
    ctx.hw = inputs[0].shape[-2:]


_cross_scan.register_autograd(
    lambda ctx, g: _cross_merge(g.reshape(*g.shape[:3], *ctx.hw)),
    setup_context=_save_hw)
_cross_merge.register_autograd(
    lambda ctx, g: _cross_scan(g).reshape(g.shape[0], 4, g.shape[1], *ctx.hw),
    setup_context=_save_hw)


def _cross_scan_triton(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, and both reversed."""
    if x.dim() != 4:
        raise ValueError(f"cross_scan expects (B, C, H, W), got {tuple(x.shape)}")
    return _cross_scan(x)


def _cross_merge_triton(ys: torch.Tensor) -> torch.Tensor:
    """(B, 4, C, H, W) -> (B, C, H, W): the adjoint of _cross_scan_triton (map each of the four
    sequences back to its pixels and sum)."""
    if ys.dim() != 5 or ys.shape[1] != 4:
        raise ValueError(f"cross_merge expects (B, 4, C, H, W), got {tuple(ys.shape)}")
    return _cross_merge(ys)


def _triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if not _HAS_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def available_backends(device: Union[str, torch.device] = "cuda") -> List[str]:
    """The selective-scan backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    names = []
    if device.type == "cuda" and _mamba_selective_scan_fn is not None:
        names.append("mamba_ssm")
    if _triton_usable(device):
        names.append("triton")
    return names + ["torch"]


def set_backend(name: Optional[str]) -> None:
    """Force the backend that ``"auto"`` resolves to, for every SS2D layer in the process.

    ``None`` restores automatic choice. The environment variable ``VMAMBA_BACKEND`` does
    the same without code changes; this function takes precedence over it.
    """
    global _forced_backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or None")
    _forced_backend = None if name == "auto" else name


def _resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a requested backend into the one that runs, or raise saying how to get it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        backend = _forced_backend or os.environ.get("VMAMBA_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"VMAMBA_BACKEND={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        best = available_backends(device)[0] if device.type == "cuda" else "torch"
        if device.type == "cuda" and best == "torch":
            _warn_once("vmamba: CUDA tensors are using the pure-PyTorch selective scan, which is "
                       f"slow on GPU. For speed: {_INSTALL_HINTS['triton']}, or "
                       f"{_INSTALL_HINTS['mamba_ssm']}.")
        return best
    if backend == "mamba_ssm":
        if _mamba_selective_scan_fn is None:
            raise RuntimeError("backend 'mamba_ssm' is not available (its CUDA kernel did not import); "
                               f"install it with: {_INSTALL_HINTS['mamba_ssm']}")
        if device.type != "cuda":
            raise ValueError(f"backend 'mamba_ssm' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and not _triton_usable(device):
        if not _HAS_TRITON:
            raise RuntimeError(f"backend 'triton' is not available; install it with: {_INSTALL_HINTS['triton']}")
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), "
                         f"got tensors on {device}")
    return backend


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = True, backend: str = "auto") -> Tensor:
    """Grouped Mamba-1 selective scan; shapes and recurrence as in :func:`selective_scan_ref`.

    Returns float32 (B, K*D, L) whatever the input dtype; differentiable in every input.
    ``backend``: ``"torch"`` (pure PyTorch, any device), ``"triton"`` (CUDA, no compiler
    needed), ``"mamba_ssm"`` (CUDA, the compiled kernel) or ``"auto"`` (the fastest that
    runs on the inputs' device; see :func:`set_backend`).
    """
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, Tensor):
            raise TypeError(f"selective_scan: {name} must be a Tensor, got {type(t).__name__}")
    if u.ndim != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must both be (B, K*D, L), got {tuple(u.shape)} "
                         f"and {tuple(delta.shape)}")
    batch, channels, length = u.shape
    if B.ndim != 4 or B.shape != C.shape or B.shape[0] != batch or B.shape[3] != length:
        raise ValueError(f"selective_scan: B and C must be (B, K, N, L) = ({batch}, K, N, {length}), "
                         f"got {tuple(B.shape)} and {tuple(C.shape)}")
    groups, state = B.shape[1], B.shape[2]
    if channels % groups or A.shape != (channels, state):
        raise ValueError(f"selective_scan: A must be (K*D, N) = ({channels}, {state}) with K*D divisible "
                         f"by K={groups}, got {tuple(A.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (channels,):
            raise ValueError(f"selective_scan: {name} must be ({channels},), got {tuple(t.shape)}")
    backend = _resolve_backend(backend, u.device)
    if backend == "mamba_ssm":
        y = _mamba_selective_scan_fn(u.contiguous(), delta.contiguous(), A.float().contiguous(),
                                     B.contiguous(), C.contiguous(),
                                     None if D is None else D.float(), z=None,
                                     delta_bias=None if delta_bias is None else delta_bias.float(),
                                     delta_softplus=delta_softplus)
        return y.float()
    if backend == "triton":
        return _selective_scan_triton(u, delta, A, B, C, D, delta_bias, delta_softplus)
    return _selective_scan_torch(u, delta, A, B, C, D, delta_bias, delta_softplus)


# ----------------------------------------------------------------------------------------
# Cross-scan and cross-merge: a feature map as four sequences, and back.


def _cross_scan_torch(x: Tensor) -> Tensor:
    rows = rearrange(x, "b c h w -> b c (h w)")                       # row-major
    cols = rearrange(x, "b c h w -> b c (w h)")                       # column-major
    xs = torch.stack([rows, cols], dim=1)                             # (B, 2, C, L)
    return torch.cat([xs, xs.flip(-1)], dim=1)                        # (B, 4, C, L)


def _cross_merge_torch(ys: Tensor) -> Tensor:
    b, _, c, h, w = ys.shape
    ys = ys.flatten(3)                                                # (B, 4, C, L)
    ys = ys[:, :2] + ys[:, 2:].flip(-1)                               # (B, 2, C, L)
    rows = rearrange(ys[:, 0], "b c (h w) -> b c h w", h=h)
    cols = rearrange(ys[:, 1], "b c (w h) -> b c h w", h=h)
    return rows + cols                                                # (B, C, H, W)


def cross_scan(x: Tensor, backend: str = "auto") -> Tensor:
    """(B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, and both reversed."""
    if x.ndim != 4:
        raise ValueError(f"cross_scan expects (B, C, H, W), got shape {tuple(x.shape)}")
    if backend != "torch" and _resolve_backend(backend, x.device) == "triton":
        return _cross_scan_triton(x)
    return _cross_scan_torch(x)


def cross_merge(ys: Tensor, backend: str = "auto") -> Tensor:
    """(B, 4, C, H, W) -> (B, C, H, W): the adjoint of :func:`cross_scan`.

    Sequence k of ``ys`` is laid out in scan order (its H, W dims are only a shape);
    each is mapped back to its pixels and the four are summed.
    """
    if ys.ndim != 5 or ys.shape[1] != 4:
        raise ValueError(f"cross_merge expects (B, 4, C, H, W), got shape {tuple(ys.shape)}")
    if backend != "torch" and _resolve_backend(backend, ys.device) == "triton":
        return _cross_merge_triton(ys)
    return _cross_merge_torch(ys)


# ----------------------------------------------------------------------------------------
# Layers. Every layer runs channels-last, (B, H, W, C): LayerNorm and Linear then act on
# contiguous channels with no permute copies. "ln2d" models (the authors' channels-first
# variant) have the same weights and compute the same function, so they run this way too.


def _one_of(name: str, value: Any, accepted: Sequence[Any]) -> Any:
    """Normalise a string option, or raise ValueError listing the accepted values."""
    key = value.lower() if isinstance(value, str) else value
    if key not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {list(accepted)}")
    return key


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
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2, on the last dim."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        if (type(self.fc1) is nn.Linear and type(self.act) is nn.GELU and self.act.approximate == "none"
                and (self.drop.p == 0 or not self.training)
                and _kept_buffers_ok(x, self.fc1.weight, self.fc1, self.act, self.drop)):
            # Inference on CPU: the wide hidden layer goes into a kept buffer, GELU in place.
            # A fresh multi-MB hidden tensor page-faults on every call (stage 1: about a
            # millisecond per block for the bias copy and again for GELU's output).
            shape = x.shape[:-1]
            h = _Buffers(x.device).get("mlp", (math.prod(shape), self.fc1.out_features))
            torch.addmm(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(), out=h)
            return self.fc2(torch._C._nn.gelu_(h)).view(*shape, -1)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def ss2d_core(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, dt_projs_bias: Tensor,
              A_logs: Tensor, Ds: Tensor, backend: str = "auto") -> Tensor:
    """The four-direction selective scan of SS2D on a channels-last map.

    x (B, H, W, D); x_proj_weight (4, R + 2N, D); dt_projs_weight (4, D, R);
    dt_projs_bias (4, D); A_logs (4*D, N); Ds (4*D,). Returns float32 (B, H, W, D):
    ``cross_merge(selective_scan(cross_scan(x), ...))``.
    """
    b, h, w, d = x.shape
    k, n, r = 4, A_logs.shape[1], dt_projs_weight.shape[2]
    A = -torch.exp(A_logs.float())                                    # (4*D, N)
    backend = _resolve_backend(backend, x.device)
    if backend == "torch":
        # x_proj is per-pixel work: computed once in pixel order; the scan gathers each
        # direction's rows into its own order and projects dt there.
        proj = F.linear(x, x_proj_weight.flatten(0, 1)).view(b, h, w, k, r + 2 * n)
        if _tracing():  # out of place, no work buffers
            dts = torch.einsum("bhwkr,kdr->bhwkd", proj[..., :r], dt_projs_weight)   # (B, H, W, 4, D)
            return _ss2d_scan_torch(x, dts, A.view(k, d, n), proj[..., r:r + n], proj[..., r + n:],
                                    Ds.view(k, d), dt_projs_bias)
        args = [t if t.dtype == torch.float32 else t.float()
                for t in (x, proj, dt_projs_weight, dt_projs_bias, A.view(k, d, n), Ds.view(k, d))]
        with torch.autocast(x.device.type, enabled=False):
            if _needs_grad(*args):
                return _SS2DProjFn.apply(*args)
            return _ss2d_proj_forward(*args, _Buffers(x.device), carries=False)[0]
    xs = cross_scan(x.permute(0, 3, 1, 2), backend)                   # (B, 4, D, L)
    proj = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight)          # (B, 4, R+2N, L)
    dts, Bs, Cs = proj.split([r, n, n], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight)        # (B, 4, D, L)
    ys = selective_scan(xs.reshape(b, k * d, h * w), dts.reshape(b, k * d, h * w), A,
                        Bs.contiguous(), Cs.contiguous(), Ds.float(), dt_projs_bias.reshape(-1).float(),
                        delta_softplus=True, backend=backend)         # (B, 4*D, L)
    y = cross_merge(ys.view(b, k, d, h, w), backend)                  # (B, D, H, W)
    return y.permute(0, 2, 3, 1)


FORWARD_TYPES = ("v0", "v05", "v05_noz")


class SS2D(nn.Module):
    """2-D selective scan: VMamba's replacement for attention.

    Input and output are channels-last (B, H, W, d_model), or (B, d_model, H, W) with
    ``channel_first=True``. ``forward_type``: ``"v0"`` and ``"v05"`` gate the output
    with ``silu(z)`` from a second half of ``in_proj``; ``"v05_noz"`` does not.
    """

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
        k, d_inner = 4, int(ssm_ratio * d_model)
        rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.d_inner, self.d_state, self.dt_rank, self.channel_first = d_inner, d_state, rank, channel_first
        self.gated = self.forward_type in ("v0", "v05")
        self.backend = "auto"

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
        d_inner, rank = self.d_inner, self.dt_rank
        # x_proj: what nn.Linear(d_inner, R + 2N) would draw, for each direction.
        bound = d_inner ** -0.5
        self.x_proj_weight.uniform_(-bound, bound)
        # dt_proj weight: keeps the variance of dt independent of the rank R.
        std = rank ** -0.5 * dt_scale
        self.dt_projs_weight.uniform_(-std, std)
        # dt bias: inverse softplus of dt drawn log-uniformly in [dt_min, dt_max], so that
        # softplus(bias) starts in that range.
        dt = torch.exp(torch.rand_like(self.dt_projs_bias) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # A = -exp(A_logs) = -(1, 2, ..., N) per channel: the S4D-real initialisation.
        n = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_logs.copy_(torch.log(n).expand_as(self.A_logs))
        # D = 1: the skip connection starts as identity.
        self.Ds.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        if self.channel_first:
            x = x.permute(0, 2, 3, 1)                                 # (B, H, W, C)
        x = self.in_proj(x)                                           # (B, H, W, D or 2D)
        z = None
        if self.gated:
            x, z = x.chunk(2, dim=-1)
        if self.conv2d is not None:
            x = self.conv2d(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)   # (B, H, W, D)
        x = F.silu(x, inplace=_inplace_ok(self.conv2d or self.in_proj))  # this layer's own fresh tensor
        y = ss2d_core(x, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias,
                      self.A_logs, self.Ds, backend=self.backend)     # (B, H, W, D) float32
        if not torch.is_autocast_enabled(y.device.type):
            y = y.to(x.dtype)  # a model cast to half precision stays in it
        y = self.out_norm(y)
        if z is not None:
            y = y * F.silu(z)
        out = self.dropout(self.out_proj(y))
        return out.permute(0, 3, 1, 2) if self.channel_first else out


class VSSBlock(nn.Module):
    """Pre-norm residual block: ``x + drop_path(SS2D(norm(x)))``, then an optional MLP.

    Input and output are channels-last (B, H, W, hidden_dim), or (B, C, H, W) with
    ``channel_first=True``. Keyword names follow the authors' code.
    """

    def __init__(self, hidden_dim: int = 96, drop_path: float = 0.0, channel_first: bool = False,
                 ssm_d_state: int = 16, ssm_ratio: float = 2.0, ssm_dt_rank: Union[int, str] = "auto",
                 ssm_act_layer: str = "silu", ssm_conv: int = 3, ssm_conv_bias: bool = True,
                 ssm_drop_rate: float = 0.0, ssm_init: str = "v0", forward_type: str = "v05_noz",
                 mlp_ratio: float = 4.0, mlp_act_layer: str = "gelu", mlp_drop_rate: float = 0.0,
                 gmlp: bool = False, post_norm: bool = False):
        super().__init__()
        _one_of("mlp_act_layer", mlp_act_layer, ("gelu",))
        _one_of("gmlp", gmlp, (False,))
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
        if self.channel_first:
            x = x.permute(0, 2, 3, 1)                                 # (B, H, W, C)
        x = self._residual(x, self.op, self.norm)
        if self.mlp is not None:
            x = self._residual(x, self.mlp, self.norm2)
        return x.permute(0, 3, 1, 2) if self.channel_first else x

    def _residual(self, x: Tensor, f: nn.Module, norm: nn.Module) -> Tensor:
        y = norm(f(x)) if self.post_norm else f(norm(x))
        if (self.drop_path.drop_prob == 0 or not self.training) and _inplace_ok(norm, *f.modules()):
            return y.add_(x)  # inference: the branch's fresh output takes the sum (no new tensor)
        return x + self.drop_path(y)


class PatchMerging(nn.Module):
    """Downsample "v1": 2x2 neighbours concatenated -> LayerNorm(4C) -> Linear(4C, 2C)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))                  # pad bottom row / right column
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2],
                       x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)    # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


class _Conv2d(nn.Conv2d):
    """nn.Conv2d fed channels-last activations (NCHW views of (B, H, W, C) memory).

    oneDNN reorders a contiguous weight to match such an input on every call; when the
    weight is much larger than the input (late stages: a 3x3 conv 384 -> 768 on a 14x14
    map ran 3x faster) copying the small input to contiguous NCHW is cheaper. Weights
    stay contiguous, as FSDP and the released checkpoints expect. ``image_input``: the
    layer reads the NCHW image and makes it channels-last first, so its output is
    channels-last too and the LayerNorm after it needs no copy."""

    def __init__(self, *args: Any, image_input: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.image_input = image_input

    def forward(self, x: Tensor) -> Tensor:
        if self.image_input:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._as_matmul(x):
            return self._matmul_forward(x)
        if not x.is_contiguous() and self.weight.numel() > 8 * x.numel():
            x = x.contiguous()
        return super().forward(x)

    def _as_matmul(self, x: Tensor) -> bool:
        """Eager CPU inference of a plain convolution whose weight outweighs its
        channels-last input (the late downsamples): run it as patches @ weight, which
        reads the contiguous weight as it is instead of reordering it for oneDNN on every
        call (3.1 vs 3.8 ms on the 384 -> 768 downsample of VMamba-T at 224 px)."""
        return (not torch.is_grad_enabled() and not _tracing() and x.device.type == "cpu" and x.dim() == 4
                and self.groups == 1
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple)
                and self.dilation == (1, 1) and self.weight.numel() >= x.numel()
                and x.is_contiguous(memory_format=torch.channels_last) and not torch.compiler.is_compiling())

    def _matmul_forward(self, x: Tensor) -> Tensor:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        x = x.permute(0, 2, 3, 1)                                        # (B, H, W, C) memory order
        if ph or pw:
            x = F.pad(x, (0, 0, pw, pw, ph, ph))
        cols = x.unfold(1, kh, sh).unfold(2, kw, sw)                      # (B, Ho, Wo, C, kh, kw)
        b, ho, wo = cols.shape[:3]
        w = self.weight.reshape(self.out_channels, -1).t()                # rows in (C, kh, kw) order
        cols = cols.reshape(b * ho * wo, -1)
        out = torch.mm(cols, w) if self.bias is None else torch.addmm(self.bias, cols, w)
        return out.view(b, ho, wo, -1).permute(0, 3, 1, 2)               # NCHW view, channels-last memory


def _make_patch_embed(version: str, in_chans: int, dim: int, patch_size: int) -> nn.Sequential:
    """NCHW image -> channels-last (B, H/patch, W/patch, dim)."""
    if version == "v1":
        return nn.Sequential(_Conv2d(in_chans, dim, patch_size, stride=patch_size, image_input=True),
                             Permute(0, 2, 3, 1), nn.LayerNorm(dim))
    stride = patch_size // 2
    return nn.Sequential(
        _Conv2d(in_chans, dim // 2, 3, stride=stride, padding=1, image_input=True), Permute(0, 2, 3, 1),
        nn.LayerNorm(dim // 2), Permute(0, 3, 1, 2), nn.GELU(),
        _Conv2d(dim // 2, dim, 3, stride=stride, padding=1), Permute(0, 2, 3, 1), nn.LayerNorm(dim))


def _make_downsample(version: str, dim: int, out_dim: int) -> nn.Module:
    """Channels-last (B, H, W, dim) -> (B, ceil(H/2), ceil(W/2), out_dim)."""
    if version == "v1":
        return PatchMerging(dim, out_dim)
    conv = (_Conv2d(dim, out_dim, 2, stride=2) if version == "v2"
            else _Conv2d(dim, out_dim, 3, stride=2, padding=1))
    return nn.Sequential(Permute(0, 3, 1, 2), conv, Permute(0, 2, 3, 1), nn.LayerNorm(out_dim))


class ClassifierHead(nn.Module):
    """LayerNorm -> global average pool -> Linear, on a channels-last map."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.norm(x).mean(dim=(1, 2))                             # (B, C)
        return x if pre_logits else self.head(x)


class VSSM(nn.Module):
    """VMamba classifier. Keyword names are the authors', so their configs work as they are.

    Defaults build VMamba-T (s1l8). Supported values: ``forward_type`` "v0" | "v05" |
    "v05_noz"; ``patchembed_version`` "v1" | "v2"; ``downsample_version`` "v1" | "v2" |
    "v3"; ``norm_layer`` "ln" | "ln2d" (same weights, same outputs). ``dims`` is the
    first stage's width (doubled per stage) or one width per stage.

    Input: float (B, in_chans, H, W). Output: logits (B, num_classes).
    """

    def __init__(self, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 depths: Sequence[int] = (2, 2, 8, 2), dims: Union[int, Sequence[int]] = 96,
                 ssm_d_state: int = 1, ssm_ratio: float = 1.0, ssm_dt_rank: Union[int, str] = "auto",
                 ssm_act_layer: str = "silu", ssm_conv: int = 3, ssm_conv_bias: bool = False,
                 ssm_drop_rate: float = 0.0, ssm_init: str = "v0", forward_type: str = "v05_noz",
                 mlp_ratio: float = 4.0, mlp_act_layer: str = "gelu", mlp_drop_rate: float = 0.0,
                 gmlp: bool = False, drop_path_rate: float = 0.2, patch_norm: bool = True,
                 norm_layer: str = "ln2d", downsample_version: str = "v3",
                 patchembed_version: str = "v2", use_checkpoint: bool = False, posembed: bool = False,
                 imgsize: int = 224, check_finite: bool = False):
        super().__init__()
        self.norm_layer = _one_of("norm_layer", norm_layer, ("ln", "ln2d"))
        self.channel_first = self.norm_layer == "ln2d"
        patchembed_version = _one_of("patchembed_version", patchembed_version, ("v1", "v2"))
        downsample_version = _one_of("downsample_version", downsample_version, ("v1", "v2", "v3"))
        _one_of("forward_type", forward_type, FORWARD_TYPES)
        _one_of("patch_norm", patch_norm, (True,))
        _one_of("posembed", posembed, (False,))
        if isinstance(dims, int):
            dims = [dims * 2 ** i for i in range(len(depths))]
        dims = [int(d) for d in dims]
        if len(dims) != len(depths) or not depths:
            raise ValueError(f"dims and depths must have one entry per stage, got dims={dims}, "
                             f"depths={list(depths)}")
        self.in_chans, self.patch_size, self.num_classes = in_chans, patch_size, num_classes
        self.depths, self.dims, self.num_features = list(depths), dims, dims[-1]
        self.head_hidden_size = dims[-1]
        self.check_finite = check_finite
        self.grad_checkpointing = use_checkpoint
        self.feature_info = [dict(num_chs=d, reduction=patch_size * 2 ** i, module=f"layers.{i}")
                             for i, d in enumerate(dims)]

        self.patch_embed = _make_patch_embed(patchembed_version, in_chans, dims[0], patch_size)
        total = sum(depths)
        rates = [drop_path_rate * j / max(total - 1, 1) for j in range(total)]   # rises linearly
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            blocks = nn.Sequential(*[
                VSSBlock(dims[i], drop_path=rates[sum(depths[:i]) + j], ssm_d_state=ssm_d_state,
                         ssm_ratio=ssm_ratio, ssm_dt_rank=ssm_dt_rank, ssm_act_layer=ssm_act_layer,
                         ssm_conv=ssm_conv, ssm_conv_bias=ssm_conv_bias, ssm_drop_rate=ssm_drop_rate,
                         ssm_init=ssm_init, forward_type=forward_type, mlp_ratio=mlp_ratio,
                         mlp_act_layer=mlp_act_layer, mlp_drop_rate=mlp_drop_rate, gmlp=gmlp)
                for j in range(depth)])
            downsample = (_make_downsample(downsample_version, dims[i], dims[i + 1])
                          if i + 1 < len(depths) else nn.Identity())
            self.layers.append(nn.Sequential(OrderedDict(blocks=blocks, downsample=downsample)))
        self.classifier = ClassifierHead(dims[-1], num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Generic layers only: SS2D's own parameters are set in SS2D.reset_ssm_parameters.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

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
        """Replace the head by a freshly initialised one with ``num_classes`` outputs."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r} is not supported; expected 'avg' or None")
        self.num_classes = num_classes
        self.classifier.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.classifier.head.apply(self._init_weights)

    def _check_input(self, x: Tensor) -> Tensor:
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
        if x.shape[0] == 0 or min(x.shape[2:]) < self.patch_size:
            raise ValueError(f"expected {expected} with batch >= 1 and H, W >= {self.patch_size}, "
                             f"got shape {tuple(x.shape)}")
        if self.check_finite and not torch.isfinite(x).all():
            raise ValueError("input contains NaN or Inf values")
        return x

    def _stage(self, i: int, x: Tensor) -> Tensor:
        """Blocks of stage i on a channels-last map (before its downsample)."""
        for block in self.layers[i].blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def _stage_indices(self, indices: Optional[Union[int, Sequence[int]]]) -> List[int]:
        """Stage numbers from timm-style ``indices``: None (all stages), an int n (the last n)
        or stage numbers (negative ones count from the end)."""
        n = len(self.layers)
        if indices is None:
            indices = list(range(n))
        elif isinstance(indices, int):
            indices = list(range(n - indices, n))
        indices = [i % n if -n <= i < n else i for i in indices]
        if any(not 0 <= i < n for i in indices):
            raise ValueError(f"indices must be stage numbers in [0, {n}), got {indices}")
        return indices

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Stage outputs (before downsampling) as a list, plus the final features.

        ``indices``: stage indices, or an int n for the last n stages (default: all).
        ``norm`` applies the classifier's LayerNorm to the last stage's map.
        ``output_fmt``: "NCHW" or "NHWC". Returns ``intermediates`` if
        ``intermediates_only`` else ``(final_features, intermediates)``.
        """
        fmt = _one_of("output_fmt", output_fmt, ("nchw", "nhwc"))
        n = len(self.layers)
        indices = self._stage_indices(indices)
        last = max(indices) if (stop_early or intermediates_only) else n - 1
        x = self.patch_embed(self._check_input(x))                    # (B, H/4, W/4, C0)
        intermediates = []
        for i in range(last + 1):
            x = self._stage(i, x)
            if i in indices:
                o = self.classifier.norm(x) if (norm and i == n - 1) else x
                intermediates.append(o.permute(0, 3, 1, 2) if fmt == "nchw" else o)
            x = self.layers[i].downsample(x)
        if intermediates_only:
            return intermediates
        return (x.permute(0, 3, 1, 2) if fmt == "nchw" else x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop what feature extraction at stages ``indices`` never uses (timm's API).

        Stages after the last of ``indices`` go, with that stage's downsample; with
        ``prune_head`` the classifier's Linear, with ``prune_norm`` its LayerNorm. Afterwards
        the model is only for :meth:`forward_intermediates`. Returns the indices as stage numbers.
        """
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
        x = self.patch_embed(self._check_input(x))                    # (B, H/4, W/4, C0)
        for i, layer in enumerate(self.layers):
            x = layer.downsample(self._stage(i, x))
        return x.permute(0, 3, 1, 2)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, C, H, W) features -> logits, or pooled features with ``pre_logits``."""
        return self.classifier(x.permute(0, 2, 3, 1), pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def flops(self, shape: Sequence[int] = (3, 224, 224)) -> float:
        """GFLOPs, counted as multiply-adds, of one input of ``shape`` (C, H, W).

        Dense operations (Linear, convolution, matmul) are counted by
        ``torch.utils.flop_counter`` (its count / 2); each selective scan of length L,
        D channels (all four directions of an SS2D) and state size N adds 9*L*D*N, the Mamba
        authors' estimate and the convention of the published table. Normalisations and
        element-wise operations are not counted. The model may be on any device (meta
        included) and is not modified: the count runs on zero-filled CPU stand-ins of its
        parameters.

        Every counted cost is per pixel except the classifier's Linear, so when H and W are
        multiples of the network's stride s the count is a + b*H*W exactly; it is then
        taken at s x s and 2s x s (fast) and evaluated at H x W.
        """
        c, h, w = shape
        stride = self.patch_size * 2 ** (len(self.dims) - 1)
        if h % stride or w % stride:
            return self._count_flops((c, h, w)) / 1e9
        small, large = self._count_flops((c, stride, stride)), self._count_flops((c, 2 * stride, stride))
        per_pixel = (large - small) / stride ** 2
        return (small + per_pixel * (h * w - stride ** 2)) / 1e9

    def _count_flops(self, shape: Sequence[int]) -> float:
        """Multiply-adds of one forward pass on a (1, *shape) input; see :meth:`flops`.

        The counter sees every matmul an SS2D runs, including any inside the scan engine.
        So the part of each SS2D outside its child modules (in_proj, conv2d, out_proj) is
        dropped from the count and replaced by its definition: the x_proj and dt_proj
        projections, 4*L*D*(R + 2N) + 4*L*D*R, plus 9*L*(4D)*N for the scan.
        """
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        started: Dict[nn.Module, int] = {}
        in_children: Dict[nn.Module, int] = {}
        replaced = []   # (counted flops of an SS2D's own code, its multiply-adds by definition)

        def start(module: nn.Module, args: Tuple[Tensor]) -> None:
            started[module] = counter.get_total_flops()

        def end_child(parent: SS2D, module: nn.Module) -> None:
            in_children[parent] = in_children.get(parent, 0) + counter.get_total_flops() - started.pop(module)

        def end_ss2d(module: SS2D, args: Tuple[Tensor], output: Tensor) -> None:
            x = args[0]                                               # (B, H, W, C) or (B, C, H, W)
            h, w = x.shape[2:] if module.channel_first else x.shape[1:3]
            pixels, d, n, r = x.shape[0] * h * w, module.d_inner, module.d_state, module.dt_rank
            own = counter.get_total_flops() - started.pop(module) - in_children.pop(module, 0)
            replaced.append((own, pixels * 4 * d * (2 * r + 2 * n) + 9 * pixels * 4 * d * n))

        hooks = []
        for m in self.modules():
            if isinstance(m, SS2D):
                hooks += [m.register_forward_pre_hook(start), m.register_forward_hook(end_ss2d)]
                for child in m.children():
                    hooks += [child.register_forward_pre_hook(start),
                              child.register_forward_hook(lambda c, a, o, p=m: end_child(p, c))]
        named = list(self.named_parameters()) + list(self.named_buffers())
        try:
            # Zeros, not fake or meta tensors: the torch scan reads values (its clamp test).
            tensors = {name: torch.zeros(t.shape, dtype=t.dtype) for name, t in named}
            x = torch.zeros(1, *shape, dtype=named[0][1].dtype)
            with torch.no_grad(), counter:
                torch.func.functional_call(self, tensors, (x,))
        finally:
            for hook in hooks:
                hook.remove()
        return (counter.get_total_flops() - sum(own for own, _ in replaced)) / 2 + sum(m for _, m in replaced)

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load a downloaded checkpoint file: timm's hook for ``pretrained=True``.

        Same as the module's :func:`load_pretrained` (any released layout, read without
        running pickled code), except that a head with another class count is replaced
        silently, as timm does when ``num_classes`` is given.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="vmamba: the checkpoint's head")
            load_pretrained(self, checkpoint_path)  # the module function


class Backbone_VSSM(VSSM):
    """VMamba backbone for detection and segmentation (the authors' ``Backbone_VSSM``).

    Returns a list of NCHW maps, one per stage in ``out_indices`` (strides 4, 8, 16, 32),
    each through its own LayerNorm ``outnorm{i}``. ``pretrained``: a path, URL or state
    dict to load (a classification checkpoint works: its head is ignored).
    """

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), pretrained: Any = None,
                 norm_layer: str = "ln", **kwargs: Any):
        kwargs["num_classes"] = 0
        super().__init__(norm_layer=norm_layer, **kwargs)
        n = len(self.layers)
        if any(not 0 <= i < n for i in out_indices) or not out_indices:
            raise ValueError(f"out_indices must be non-empty stage numbers in [0, {n}), got {list(out_indices)}")
        self.out_indices = sorted(set(out_indices))
        del self.classifier
        for i in self.out_indices:
            self.add_module(f"outnorm{i}", nn.LayerNorm(self.dims[i]))
        self.feature_info = [self.feature_info[i] for i in self.out_indices]
        if pretrained:
            load_pretrained(self, pretrained)

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.patch_embed(self._check_input(x))                    # (B, H/4, W/4, C0)
        outs = []
        for i in range(self.out_indices[-1] + 1):
            x = self._stage(i, x)
            if i in self.out_indices:
                out = getattr(self, f"outnorm{i}")(x)
                outs.append(out.permute(0, 3, 1, 2).contiguous())    # (B, C_i, H_i, W_i)
            x = self.layers[i].downsample(x)
        return outs

    def forward_features(self, x: Tensor) -> Tensor:
        raise TypeError("Backbone_VSSM has no classifier: call the backbone itself for its feature maps")

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        raise TypeError("Backbone_VSSM has no classifier head")


# ----------------------------------------------------------------------------------------
# Checkpoints: reading files safely, downloading once, converting any released layout.

# Inert placeholders


@dataclasses.dataclass(frozen=True)
class PickledGlobal:
    """Stand-in for a class or function that a checkpoint refers to by name.

    The named module is never imported and the name is never looked up.
    """

    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclasses.dataclass(eq=False, repr=False)
class PickledObject:
    """Stand-in for an object the pickle would have built by calling ``factory``.

    Nothing is called: the arguments and any later pickle operations on the
    object are only recorded.

    Attributes:
        factory: the placeholder that would have been called / instantiated.
        args, kwargs: the arguments it would have been called with.
        state: what ``__setstate__`` would have received (e.g. the instance
            ``__dict__`` of a plain Python object), or None.
        listitems: items appended to it (list subclasses).
        dictitems: items assigned to it (dict subclasses such as yacs' CfgNode).
    """

    factory: "PickledGlobal | PickledObject"
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    state: Any = None
    listitems: list = dataclasses.field(default_factory=list)
    dictitems: dict = dataclasses.field(default_factory=dict)

    @property
    def global_name(self) -> str:
        """Dotted name of the global at the root of the factory chain."""
        factory = self.factory
        while isinstance(factory, PickledObject):
            factory = factory.factory
        return str(factory)

    def __repr__(self) -> str:
        # Deliberately short: args/state may hold large tensors or cycles.
        return f"<PickledObject {self.global_name}>"


_PLACEHOLDER_TYPES = (PickledGlobal, PickledObject)


# Restricted unpickler

# Mirrors torch's weights_only loader: globals from these modules are never
# admitted, even if a user allowlisted them with add_safe_globals().
_BLOCKED_MODULES = frozenset({"sys", "os", "posix", "nt"})


def _admitted_globals() -> dict[str, Any]:
    """Globals that ``torch.load(weights_only=True)`` admits, keyed "module.name".

    These are the tensor/storage/dtype/rebuild-function globals torch itself
    calls with untrusted arguments when loading with ``weights_only=True``,
    plus anything the user allowlisted via torch.serialization.add_safe_globals.
    """
    admitted = dict(_weights_only_unpickler._get_allowed_globals())
    admitted.update(_weights_only_unpickler._get_user_allowed_globals())
    # Legacy sparse tensor constructors (torch.sparse.FloatTensor, ...): torch's
    # own unpickler queues their results for invariant validation, which a
    # plain pickle_module cannot do, so they stay placeholders. Modern sparse
    # tensors use torch._utils._rebuild_sparse_tensor, which queues itself.
    return {
        key: obj
        for key, obj in admitted.items()
        if not (
            isinstance(obj, type)
            and obj in torch._tensor_classes
            and "sparse" in obj.__module__
        )
    }


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that never imports or calls anything outside the allowlist.

    Built on the pure-Python ``pickle._Unpickler`` rather than the C
    ``pickle.Unpickler`` because overriding ``find_class`` alone is not
    enough: the C implementation would still call ``__setstate__`` /
    ``append`` / ``__setitem__`` / ``__new__`` on whatever object is on the
    stack. Here every opcode that calls into an object is overridden:

    * GLOBAL / STACK_GLOBAL / INST: admitted globals resolve to the real
      object; every other name becomes a :class:`PickledGlobal`.
    * REDUCE / NEWOBJ / NEWOBJ_EX / INST / OBJ: admitted callables are called
      (exactly as torch's weights_only loader would); calling a placeholder
      yields a new :class:`PickledObject`; anything else is refused.
    * BUILD: recorded on placeholders; applied to tensors, parameters and
      instances of admitted types with torch's weights_only rules.
    * APPEND(S) / SETITEM(S) / ADDITEMS: only on plain containers (or recorded
      on placeholders).
    * PERSID / BINPERSID: only tensor storages (and legacy module class
      references, which resolve to the already-restricted class object).
    * EXT1/2/4 (copyreg extension registry): refused.

    ``torch.load`` subclasses this class and installs its own
    ``persistent_load`` which materialises tensor storages.
    """

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self._admitted = _admitted_globals()
        # Identity lookup: `x in list` would use __eq__ of untrusted objects.
        self._admitted_by_id = {id(obj): obj for obj in self._admitted.values()}

    def _is_admitted(self, obj: Any) -> bool:
        return self._admitted_by_id.get(id(obj)) is obj

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:
            # Python 2 pickles: same renaming as pickle.Unpickler (pure data).
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        if module not in _BLOCKED_MODULES:
            admitted = self._admitted.get(f"{module}.{name}")
            if admitted is not None:
                return admitted
        return PickledGlobal(module, name)

    def _call(self, func: Any, args: Any, kwargs: dict) -> Any:
        """Result of ``func(*args, **kwargs)``, only for admitted callables."""
        if isinstance(func, _PLACEHOLDER_TYPES):
            return PickledObject(func, tuple(args), dict(kwargs))
        if self._is_admitted(func):
            return func(*args, **kwargs)
        raise pickle.UnpicklingError(
            f"refusing to call non-allowlisted object of type {type(func).__name__}"
        )

    def _new(self, cls: Any, args: Any, kwargs: dict) -> Any:
        """Result of ``cls.__new__(cls, *args, **kwargs)`` (NEWOBJ)."""
        if isinstance(cls, _PLACEHOLDER_TYPES):
            return PickledObject(cls, tuple(args), dict(kwargs))
        if cls is torch.nn.Parameter:
            # Same special case as torch's weights_only unpickler.
            return torch.nn.Parameter(*args, **kwargs)
        if isinstance(cls, type) and self._is_admitted(cls):
            return cls.__new__(cls, *args, **kwargs)
        raise pickle.UnpicklingError(
            f"refusing to instantiate non-allowlisted object of type {type(cls).__name__}"
        )

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args, {})

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, {}))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    def _instantiate(self, klass, args):
        # Shared by the protocol 0/1 opcodes INST and OBJ.
        self.append(self._call(klass, args, {}))

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        kind = type(inst)
        if kind is PickledObject:
            inst.state = state
        elif kind is torch.Tensor:
            inst.set_(*state)  # legacy tensor pickles, as in torch's loader
        elif kind is torch.nn.Parameter:
            inst.__setstate__(state)
        elif kind is OrderedDict:
            inst.__dict__.update(state)
        elif self._is_admitted(kind):
            # Instance of an admitted type: standard pickle BUILD semantics.
            setstate = getattr(inst, "__setstate__", None)
            if setstate is not None:
                setstate(state)
                return
            slotstate = None
            if isinstance(state, tuple) and len(state) == 2:
                state, slotstate = state
            if state:
                inst.__dict__.update(state)
            for key, value in (slotstate or {}).items():
                setattr(inst, key, value)
        else:
            raise pickle.UnpicklingError(
                f"refusing to set the state of a {kind.__name__} object"
            )

    def _list_target(self) -> list:
        target = self.stack[-1]
        if isinstance(target, PickledObject):
            return target.listitems
        if type(target) is list or (
            isinstance(target, list) and self._is_admitted(type(target))
        ):
            return target
        raise pickle.UnpicklingError(
            f"refusing to append to a {type(target).__name__} object"
        )

    def _dict_target(self) -> dict:
        target = self.stack[-1]
        if isinstance(target, PickledObject):
            return target.dictitems
        if type(target) in (dict, OrderedDict, Counter):
            return target
        raise pickle.UnpicklingError(
            f"refusing to set items on a {type(target).__name__} object"
        )

    def load_append(self):
        value = self.stack.pop()
        self._list_target().append(value)

    def load_appends(self):
        items = self.pop_mark()
        self._list_target().extend(items)

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._dict_target()[key] = value

    def load_setitems(self):
        items = self.pop_mark()
        target = self._dict_target()
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_additems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            raise pickle.UnpicklingError(
                f"refusing to add items to a {type(target).__name__} object"
            )
        target.update(items)

    def _checked_persistent_load(self, pid: Any) -> Any:
        """Resolve a persistent id; only tensor storages are accepted."""
        typename = pid[0] if type(pid) is tuple and pid else None
        if isinstance(typename, bytes):
            typename = typename.decode("ascii", "replace")
        if typename == "storage":
            return self.persistent_load(pid)  # installed by torch.load
        if typename == "module" and len(pid) == 4:
            # Legacy-format nn.Module pickles reference their class as
            # ("module", cls, source_file, source). torch would compare the
            # source with the current class (and may write a .patch file); the
            # class is a placeholder here anyway, so just return it.
            return pid[1]
        raise pickle.UnpicklingError(f"unsupported persistent id type {typename!r}")

    def load_persid(self):
        pid = self.readline()[:-1].decode("ascii")
        self.append(self._checked_persistent_load(pid))

    def load_binpersid(self):
        pid = self.stack.pop()
        self.append(self._checked_persistent_load(pid))

    def get_extension(self, code):
        # The copyreg extension registry would resolve names outside
        # find_class and cache the result process-wide; torch never uses it.
        raise pickle.UnpicklingError("pickle extension codes are not supported")


# pickle._Unpickler dispatches through a class-level {opcode: function} table
# built from its own methods; rebind it so the overrides above take effect.
_RestrictedUnpickler.dispatch = {
    opcode: getattr(_RestrictedUnpickler, func.__name__)
    for opcode, func in pickle._Unpickler.dispatch.items()
}


def _restricted_load(file, **kwargs) -> Any:
    """``pickle.load`` counterpart of :class:`_RestrictedUnpickler`."""
    return _RestrictedUnpickler(file, **kwargs).load()


# torch.load(pickle_module=...) needs `Unpickler` and `load` (the latter for
# the legacy non-zip format's header records), and a `__name__`.
_RESTRICTED_PICKLE = types.ModuleType(
    f"{__name__}._restricted_pickle",
    "pickle module stand-in that turns unknown globals into placeholders",
)
_RESTRICTED_PICKLE.Unpickler = _RestrictedUnpickler
_RESTRICTED_PICKLE.load = _restricted_load
_RESTRICTED_PICKLE.UnpicklingError = pickle.UnpicklingError


# Checkpoint loading


def _check_format_for_restricted_load(source: str) -> None:
    """Refuse archive formats that torch.load handles outside the unpickler.

    ``torch.load(weights_only=False)`` hands TorchScript archives to
    ``torch.jit.load`` (which runs TorchScript code) and extracts legacy tar
    checkpoints to disk. torch.load(weights_only=True) already rejects both
    before unpickling, so this is a local guarantee rather than a new rule.
    """
    with open(source, "rb") as file:
        magic = file.read(4)
    if magic == b"PK\x03\x04":
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()
        if any(posixpath.basename(name) == "constants.pkl" for name in names):
            raise ValueError(
                f"{source} is a TorchScript archive; load it with torch.jit.load "
                "only if you trust its source"
            )
    elif tarfile.is_tarfile(source):
        raise ValueError(f"{source} uses the legacy tar checkpoint format")


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """Load a checkpoint onto the CPU without executing code from its pickle.

    Tries ``torch.load(path, map_location="cpu", weights_only=True)`` first.
    If torch's weights-only unpickler rejects the file (typically a global it
    does not allow, such as a config class, ``argparse.Namespace`` or numpy
    scalar in training metadata), the file is loaded again with a restricted
    unpickler that admits exactly the globals torch's weights-only loader
    admits (tensors, storages, dtypes, tensor rebuild functions, plain
    containers) and replaces every other class or function with an inert
    :class:`PickledGlobal`; objects built from them become
    :class:`PickledObject` records. Nothing outside the allowlist is imported
    or called, so e.g. ``__reduce__`` payloads calling ``os.system`` or
    ``eval`` come back as placeholders instead of running.

    Supports the zip format (default ``torch.save``) and the legacy non-zip
    format (``_use_new_zipfile_serialization=False``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a directory.
        ValueError: the file is truncated, corrupt or not a PyTorch checkpoint
            (chained from the underlying error).
    """
    source = os.fspath(path)
    if not os.path.exists(source):
        raise FileNotFoundError(errno.ENOENT, "Checkpoint file not found", source)
    if os.path.isdir(source):
        raise IsADirectoryError(
            errno.EISDIR, "Checkpoint path is a directory, not a file", source
        )
    # Surface permission problems as the OSError they are, not as "corrupt".
    with open(source, "rb"):
        pass

    try:
        try:
            return torch.load(source, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # torch reports every weights-only rejection (disallowed global,
            # unsupported opcode, ...) as UnpicklingError; other failures
            # (corrupt zip, TorchScript, legacy tar) are final.
            # The aborted attempt may have queued sparse tensors for
            # validation without ever validating (or, in the legacy format,
            # filling) them; drop them so they cannot fail the next load.
            torch._utils._sparse_tensors_to_validate.clear()
        _check_format_for_restricted_load(source)
        # weights_only=True always validates sparse tensors (bad indices can
        # cause out-of-bounds reads later); otherwise torch only does so when
        # this (process-global) switch is on.
        with torch.sparse.check_sparse_tensor_invariants(enable=True):
            return torch.load(
                source,
                map_location="cpu",
                weights_only=False,
                pickle_module=_RESTRICTED_PICKLE,
            )
    except Exception as err:
        raise ValueError(
            f"{source} could not be read as a PyTorch checkpoint: "
            f"{type(err).__name__}: {err}"
        ) from err


# Cached download

# Socket timeout (seconds) for connecting and for each read.
_DOWNLOAD_TIMEOUT_S = 60.0
_DOWNLOAD_CHUNK_BYTES = 1 << 20
_MAX_FILE_NAME_CHARS = 200
_SHA256_RE = re.compile(r"[0-9a-f]{8,64}")


def _cache_file_name(url: str) -> str:
    """Filesystem-safe cache file name derived from the last URL path segment.

    The segment is percent-decoded, then every character outside
    ``[A-Za-z0-9._+-]`` (path separators, '#', '%', spaces, control and
    non-ASCII characters) becomes '_'. Leading dots are dropped so the result
    is never '.', '..' or a hidden file.
    """
    segment = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]
    name = urllib.parse.unquote(segment, errors="replace")
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".")
    if not name:
        raise ValueError(f"cannot derive a cache file name from URL {url!r}")
    if len(name) > _MAX_FILE_NAME_CHARS:
        stem, ext = os.path.splitext(name)
        ext = ext[:20]
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        name = f"{stem[: _MAX_FILE_NAME_CHARS - len(ext) - 17]}-{digest}{ext}"
    return name


def _normalize_sha256(sha256: str | None) -> str | None:
    """Lower-case hex digest or prefix (>= 8 chars); ValueError if malformed."""
    if sha256 is None:
        return None
    normalized = sha256.strip().lower()
    if not _SHA256_RE.fullmatch(normalized):
        raise ValueError(
            "sha256 must be a SHA-256 hex digest or a prefix of at least 8 hex "
            f"characters, got {sha256!r}"
        )
    return normalized


def _file_sha256(path: str) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_DOWNLOAD_CHUNK_BYTES), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _fetch(url: str, out, dest: str, progress: bool) -> str:
    """Stream ``url`` into the open file ``out``; return the body's SHA-256.

    Network failures (HTTP error status, refused connection, timeout, a body
    shorter than its Content-Length) raise RuntimeError naming URL and ``dest``.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "vmamba.py"})
    hasher = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            length_header = response.headers.get("Content-Length")
            expected = int(length_header) if length_header else None
            # torch.hub.tqdm is the real tqdm when installed, else torch's
            # minimal stderr fallback; both honour `disable`.
            with torch.hub.tqdm(
                total=expected,
                disable=not progress,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
            ) as bar:
                while chunk := response.read(_DOWNLOAD_CHUNK_BYTES):
                    out.write(chunk)
                    hasher.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException, ValueError) as err:
        # OSError covers urllib.error.URLError/HTTPError, refused or reset
        # connections and timeouts; HTTPException covers malformed or cut-off
        # responses; ValueError a malformed Content-Length.
        raise RuntimeError(f"Failed to download {url} to {dest}: {err}") from err
    # http.client returns EOF silently when a server closes early, so check.
    if expected is not None and received != expected:
        raise RuntimeError(
            f"Failed to download {url} to {dest}: connection closed after "
            f"{received} of {expected} bytes"
        )
    return hasher.hexdigest()


def _download_atomically(
    url: str, dest: str, expected_sha256: str | None, progress: bool
) -> None:
    """Download into a temporary file next to ``dest``, then rename it.

    The rename is atomic on the same filesystem, so ``dest`` either does not
    exist or holds a complete (and, if requested, verified) download.
    """
    partial = f"{dest}.{uuid.uuid4().hex}.partial"
    try:
        with open(partial, "xb") as out:
            actual = _fetch(url, out, dest, progress)
        if expected_sha256 is not None and not actual.startswith(expected_sha256):
            raise ValueError(
                f"SHA-256 mismatch for {url}: expected {expected_sha256}, got "
                f"{actual}; the download was deleted"
            )
        os.replace(partial, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


def download_cached(
    url: str,
    sha256: str | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """Download ``url`` once into a cache directory and return the local path.

    Args:
        url: http:// or https:// URL. The cache file name is the last path
            segment, percent-decoded and sanitised (see ``_cache_file_name``);
            different URLs with the same file name share one cache entry, as
            with torch.hub.
        sha256: optional expected SHA-256, the full hex digest or a prefix of
            at least 8 hex characters. A fresh download that does not match is
            deleted and raises ValueError; a cached file that does not match is
            deleted and downloaded again (once).
        progress: show a progress bar on stderr.
        cache_dir: defaults to ``<torch.hub.get_dir()>/checkpoints``.

    Returns:
        Path of the cached file.

    Raises:
        ValueError: bad URL scheme / sha256 argument, or SHA-256 mismatch
            (message names the URL, expected and actual digest).
        RuntimeError: the download failed (HTTP error, unreachable host,
            timeout, truncated body); the message names the URL and the cache
            path, and the original error is chained. No file is left at the
            cache path.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"only http(s) URLs can be downloaded, got {url!r}")
    expected = _normalize_sha256(sha256)
    if cache_dir is None:
        cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    cache_dir = os.fspath(cache_dir)
    dest = os.path.join(cache_dir, _cache_file_name(url))

    if os.path.isfile(dest):
        if expected is None:
            return dest
        actual = _file_sha256(dest)
        if actual.startswith(expected):
            return dest
        warnings.warn(
            f"Cached file {dest} has SHA-256 {actual}, expected {expected}; "
            f"downloading {url} again",
            stacklevel=2,
        )
        with contextlib.suppress(FileNotFoundError):
            os.remove(dest)

    os.makedirs(cache_dir, exist_ok=True)
    _download_atomically(url, dest, expected, progress)
    return dest


_WRAPPER_KEYS = ("model", "state_dict", "model_ema")   # the first one present is used
_PREFIXES = ("module.", "backbone.")
# The February 2024 layout of the vanilla models -> ours.
_RENAMES = (
    (re.compile(r"^patch_embed\.proj\."), "patch_embed.0."),
    (re.compile(r"^patch_embed\.norm\."), "patch_embed.2."),
    (re.compile(r"\.ln_1\."), ".norm."),
    (re.compile(r"\.self_attention\."), ".op."),
    (re.compile(r"^norm\."), "classifier.norm."),
    (re.compile(r"^head\."), "classifier.head."),
)
# The authors' newer single-file layout: unstacked projections -> stacked parameters.
_UNSTACKED = {"op.x_proj.weight": "op.x_proj_weight", "op.dt_projs.weight": "op.dt_projs_weight",
              "op.dt_projs.bias": "op.dt_projs_bias"}
_MERGING = re.compile(r"^(layers\.\d+\.downsample)\.([12])\.(weight|bias)$")


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


def checkpoint_filter_fn(checkpoint: Any, model: nn.Module) -> Dict[str, Tensor]:
    """Convert any known checkpoint layout to ``model``'s state-dict layout.

    Accepts the released layout, the authors' newer single-file layout (unstacked
    ``x_proj``/``dt_projs``, ``downsample.1/.2`` patch merging), the February 2024 layout
    (``patch_embed.proj``, ``ln_1``, ``self_attention``, top-level ``norm``/``head``),
    ``module.``/``backbone.`` prefixes and ``model``/``state_dict``/``model_ema`` wrappers.
    Pure: neither argument is modified. Keys the model does not know are passed through
    (``load_pretrained`` reports them).
    """
    state = _unwrap_checkpoint(checkpoint)
    if any(k.startswith("backbone.") for k in state):   # detection/segmentation: keep the backbone
        state = {k: v for k, v in state.items() if k.startswith("backbone.")}
    own = model.state_dict()
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        for old, new in _UNSTACKED.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        merging = _MERGING.match(key)
        if merging and merging.group(1) + ".norm.weight" in own:
            part = "norm" if merging.group(2) == "1" else "reduction"
            key = f"{merging.group(1)}.{part}.{merging.group(3)}"
        if key in own and value.shape != own[key].shape and value.numel() == own[key].numel() \
                and key.rsplit(".", 1)[-1] in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias"):
            value = value.reshape(own[key].shape)
        out[key] = value
    if not hasattr(model, "classifier"):
        out = {k: v for k, v in out.items() if not k.startswith("classifier.")}
    return out


def _is_url(source: Any) -> bool:
    return isinstance(source, str) and source.split("://", 1)[0].lower() in ("http", "https")


def load_pretrained(model: nn.Module, source: Any, strict: bool = True,
                    sha256: Optional[str] = None, progress: bool = True) -> nn.Module:
    """Load weights into ``model`` from a path, an http(s) URL or an in-memory state dict.

    URLs are downloaded once into torch.hub's cache (``torch.hub.get_dir()/checkpoints``)
    with a progress bar, and checked against ``sha256`` when given. Any layout of
    :func:`checkpoint_filter_fn` is accepted. Checkpoint files are read without running
    any code they contain.

    ``strict`` (default): every parameter must be loaded with the right shape, except a
    classifier head whose class count differs from the model's (it stays freshly
    initialised, with a warning) and a backbone's ``outnorm`` layers when the checkpoint
    is a classification one. On any error the model is left unchanged. Returns ``model``.
    """
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
    own = model.state_dict()
    tolerated = set()
    head = "classifier.head.weight"
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
        examples = "; ".join(f"{label} e.g. {items[:3]}" for label, items in
                             (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
                             if items)
        if strict:
            raise ValueError(f"cannot load {name} into {type(model).__name__} ({report}): {examples}. "
                             "Is it a checkpoint of another architecture? The model is unchanged.")
        warnings.warn(f"vmamba: partial load of {name} ({report}): {examples}", stacklevel=2)
        state = {k: v for k, v in state.items() if k in own and state[k].shape == own[k].shape}
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    return model


# ----------------------------------------------------------------------------------------
# The model zoo: the nine ImageNet-1K models released by the authors.

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
    if kwargs.pop("features_only", False):
        model_args["norm_layer"] = "ln"  # a backbone's layout; weights are the same
        model = Backbone_VSSM(**dict(model_args, **kwargs))
    else:
        model = VSSM(**dict(model_args, **kwargs))
    if pretrained is True:
        load_pretrained(model, pretrained_url(name))
    elif pretrained:
        load_pretrained(model, pretrained)
    return model


def vanilla_vmamba_tiny(pretrained: Union[bool, str] = False, **kwargs: Any) -> VSSM:
    """VMamba-T, vanilla (v0, N=16, no MLP): 22.9M params, 5.6 GFLOPs, 82.2% top-1."""
    return _build("vanilla_vmamba_tiny", pretrained, **kwargs)


def vanilla_vmamba_small(pretrained: Union[bool, str] = False, **kwargs: Any) -> VSSM:
    """VMamba-S, vanilla (v0, N=16, no MLP): 44.4M params, 11.2 GFLOPs, 83.5% top-1."""
    return _build("vanilla_vmamba_small", pretrained, **kwargs)


def vanilla_vmamba_base(pretrained: Union[bool, str] = False, **kwargs: Any) -> VSSM:
    """VMamba-B, vanilla (v0, N=16, no MLP): 76.3M params, 18.0 GFLOPs, 83.7% top-1."""
    return _build("vanilla_vmamba_base", pretrained, **kwargs)


def vmamba_tiny_s2l5(pretrained: Union[bool, str] = False, **kwargs: Any) -> VSSM:
    """VMamba-T (ssm_ratio 2, depth 5 in stage 3): 30.7M params, 4.9 GFLOPs, 82.5% top-1."""
    return _build("vmamba_tiny_s2l5", pretrained, **kwargs)


def vmamba_small_s2l15(pretrained: Union[bool, str] = False, **kwargs: Any) -> VSSM:
    """VMamba-S (ssm_ratio 2, depth 15 in stage 3): 50.1M params, 8.7 GFLOPs, 83.6% top-1."""
    return _build("vmamba_small_s2l15", pretrained, **kwargs)


def vmamba_base_s2l15(pretrained: Union[bool, str] = False, **kwargs: Any) -> VSSM:
    """VMamba-B (ssm_ratio 2, depth 15 in stage 3): 88.6M params, 15.4 GFLOPs, 83.9% top-1."""
    return _build("vmamba_base_s2l15", pretrained, **kwargs)


def vmamba_tiny_s1l8(pretrained: Union[bool, str] = False, **kwargs: Any) -> VSSM:
    """VMamba-T (ssm_ratio 1, depth 8 in stage 3): 30.2M params, 4.9 GFLOPs, 82.6% top-1."""
    return _build("vmamba_tiny_s1l8", pretrained, **kwargs)


def vmamba_small_s1l20(pretrained: Union[bool, str] = False, **kwargs: Any) -> VSSM:
    """VMamba-S (ssm_ratio 1, depth 20 in stage 3): 49.0M params, 8.6 GFLOPs, 83.3% top-1."""
    return _build("vmamba_small_s1l20", pretrained, **kwargs)


def vmamba_base_s1l20(pretrained: Union[bool, str] = False, **kwargs: Any) -> VSSM:
    """VMamba-B (ssm_ratio 1, depth 20 in stage 3): 86.6M params, 15.2 GFLOPs, 83.8% top-1."""
    return _build("vmamba_base_s1l20", pretrained, **kwargs)


def create_model(name: str, pretrained: Union[bool, str] = False, **kwargs: Any) -> VSSM:
    """Build a released model by name; ``pretrained`` is False, True (the released
    weights) or a path/URL. Every keyword reaches the model (``num_classes=10`` works;
    ``features_only=True, out_indices=(1, 2, 3)`` gives a :class:`Backbone_VSSM`)."""
    model_config(name)
    return globals()[name](pretrained=pretrained, **kwargs)


# ----------------------------------------------------------------------------------------
# Helpers shared by the command-line tools below.


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def _print_table(rows: List[Dict[str, Any]], columns: Sequence[str]) -> None:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)))


# ----------------------------------------------------------------------------------------
# Ecosystem: the FLOPs table, timm's registry and OpenMMLab's. Each optional package is
# imported here, only when present; nothing else in this file needs them.


def _flops_table(shape: Sequence[int] = (3, 224, 224),
                 names: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Params and GFLOPs of zoo models (default: all) beside the published GFLOPs.

    Models are built on the meta device (no initialisation), so this takes seconds. Each row:
    ``model``, ``params_m`` (millions), ``gflops``, ``published_gflops`` (at 224 px) and
    ``error`` (relative, only at 224 px).
    """
    rows = []
    for name in names or list_models():
        with torch.device("meta"):
            model = create_model(name)
        gflops = model.flops(shape)
        published = _ZOO[name][3]
        at_224 = tuple(shape) == (3, 224, 224)
        rows.append(dict(model=name, params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                         gflops=round(gflops, 2), published_gflops=published,
                         error=f"{gflops / published - 1:+.1%}" if at_224 else "-"))
    return rows


def _cmd_flops(args: argparse.Namespace) -> int:
    names = args.model.split(",") if args.model else None
    rows = _flops_table((3, args.size, args.size), names)
    print(f"params and GFLOPs (multiply-adds) at {args.size}x{args.size}; scans count 9*L*D*N")
    _print_table(rows, ["model", "params_m", "gflops", "published_gflops", "error"])
    return 0


# timm: the nine models under their own names, with timm's pretrained configurations.
# The released files hold training state besides the weights, which timm's weights-only
# loader refuses, so ``custom_load`` hands the downloaded file to VSSM.load_pretrained.
default_cfgs: Dict[str, Dict[str, Any]] = {
    name: dict(url=pretrained_url(name), custom_load=True, num_classes=1000, pool_size=(7, 7),
               first_conv="patch_embed.0", classifier="classifier.head", license="mit",
               paper_ids="arXiv:2401.10166", origin_url="https://github.com/MzeroMiko/VMamba",
               **EVAL_CONFIG)
    for name in _ZOO
}


def _create_timm_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a zoo model through timm's ``build_model_with_cfg`` (pretrained weights,
    ``features_only`` wrapping through ``forward_intermediates``, pretrained_cfg)."""
    from timm.models import build_model_with_cfg

    return build_model_with_cfg(
        VSSM, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **dict(model_config(name), **kwargs))


def _timm_entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create_timm_model(name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name   # timm registers it under this name
    entrypoint.__doc__ = f"timm entry point of {name}; its configuration is default_cfgs[{name!r}]."
    return entrypoint


def register_timm() -> List[str]:
    """Register the zoo with timm: ``timm.create_model("vmamba_tiny_s1l8", pretrained=True,
    num_classes=10)``, ``features_only=True, out_indices=(1, 2, 3)`` and
    ``timm.data.resolve_data_config({}, model=m)`` then work.

    Done on import when timm is installed (except when this file runs as a script).
    Idempotent: a name registered by another module is left alone, and this module's own
    earlier registration (a reload) is replaced silently. Returns the names registered.
    Raises ImportError when timm is not installed.
    """
    from timm.models import is_model, model_entrypoint, register_model

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
    """Register :class:`Backbone_VSSM` as ``"MM_VSSM"`` (the authors' name) in the MODELS
    registries of mmengine and, when installed, mmdet and mmseg, so the authors'
    detection and segmentation configs (``backbone=dict(type="MM_VSSM", ...)``) build it.

    Call it once before building from such a config; calling it again is harmless.
    Returns the registered class. Raises ImportError naming what to install when
    mmengine is missing.
    """
    try:
        from mmengine.registry import MODELS
    except ImportError as e:
        raise ImportError("register_mm needs OpenMMLab's mmengine (and mmdet or mmseg for their "
                          "pipelines): pip install -U openmim && mim install mmengine mmdet mmsegmentation"
                          ) from e
    registries = [MODELS]
    for package in ("mmdet", "mmseg"):
        try:
            registries.append(importlib.import_module(f"{package}.registry").MODELS)
        except ImportError:
            pass
    for registry in registries:
        registry.register_module(name="MM_VSSM", module=Backbone_VSSM, force=True)
    return Backbone_VSSM


if __name__ != "__main__":   # the command line does not need timm; spare it the import
    try:
        register_timm()
    except ImportError:
        pass
    except Exception as e:  # e.g. a torchvision built for another torch, imported by timm
        warnings.warn(f"vmamba: timm is installed but failed to import ({type(e).__name__}: {e}); "
                      "the models are not registered with timm", stacklevel=2)


# ----------------------------------------------------------------------------------------
# Analysis: what the model sees and what it costs. Effective receptive fields, activation
# maps, the implicit attention of SS2D's four scans, and latency, throughput and memory
# against resolution; as functions, and as the commands ``erf``, ``activations`` and
# ``scaling``. Only torch is needed to compute; plots need matplotlib, sample photographs
# scikit-image, other architectures timm, each imported when asked for.


def _optional_import(module: str, package: str, purpose: str) -> Any:
    """Import an optional dependency, or raise ImportError naming its pip install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{purpose} needs {package}; install it with: pip install {package}") from e


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
def capture_scan_input(op: SS2D):
    """Within the block, each forward of ``op`` appends its scan input to the yielded list.

    The scan input u (B, H, W, D) is what :func:`ss2d_core` receives: the SiLU of the
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


def _scan_order(h: int, w: int, device: Union[str, torch.device] = "cpu") -> Tensor:
    """(4, H*W) long: the pixel index (i * W + j) at each position of each scan direction."""
    pixels = torch.arange(h * w, dtype=torch.float64, device=device).view(1, 1, h, w)
    return cross_scan(pixels, backend="torch")[0, :, 0].long()       # (4, L)


def ss2d_attention(op: SS2D, u: Tensor, query: Tuple[int, int]) -> Tensor:
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
    the rows and the columns, 2 and 3 the same backwards (as :func:`cross_scan`).
    """
    h, w, d = u.shape
    n, r = op.d_state, op.dt_rank
    with torch.no_grad():
        xs = cross_scan(u.permute(2, 0, 1)[None].double(), backend="torch")[0]    # (4, D, L)
        proj = torch.einsum("kcd,kdl->kcl", op.x_proj_weight.double(), xs)        # (4, R+2N, L)
        dt_low, Bs, Cs = proj.split([r, n, n], dim=1)                             # (4, R|N|N, L)
        dt = F.softplus(torch.einsum("kdr,krl->kdl", op.dt_projs_weight.double(), dt_low)
                        + op.dt_projs_bias.double()[..., None])                   # (4, D, L)
        A = -torch.exp(op.A_logs.double()).view(4, d, n)                          # (4, D, N)
        elapsed = dt.cumsum(-1)                                                   # (4, D, L)
        order = _scan_order(h, w, u.device)                                       # (4, L)
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
def activation_maps(model: VSSM, x: Tensor) -> List[Tensor]:
    """Per stage, the L2 norm over channels of its output at each position, (h_i, w_i) float32
    on the CPU, for one image x (1, 3, H, W)."""
    return [f[0].float().norm(dim=0).cpu() for f in model.forward_intermediates(x, intermediates_only=True)]


def _peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Memory a call of ``fn`` needs beyond what was allocated before it, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the memory allocated
    before. CPU (Linux): growth of the process's peak resident set, VmHWM, reset through
    /proc/self/clear_refs after freed heap memory is handed back with glibc's malloc_trim;
    it counts every allocation, torch's and others', page by page. The kept CPU work
    buffers are released first (free_scan_buffers), so the call's own count includes them.
    NaN elsewhere.
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

    free_scan_buffers()
    try:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)                          # glibc only
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                              # VmHWM := VmRSS
        before = status_kib("VmRSS")
    except OSError:
        _warn_once(f"peak memory on {device.type} needs Linux's /proc/self/clear_refs; reported as NaN")
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


# Command-line side: models by name, images, figures and files.

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry")
_SCAN_NAMES = ("rows →", "columns ↓", "rows, reversed ←", "columns, reversed ↑")
_ERF_FLOOR = 1e-12  # ERF plots show at most this range below the maximum


def _analysis_models(names: Optional[str], config: Optional[str], pretrained: Any
                     ) -> List[Tuple[str, Callable[[], nn.Module]]]:
    """(label, builder) for each comma-separated name: a zoo model, built with the --config
    keywords over its own; else a timm model. No names: ``VSSM(**config)``."""
    kwargs = json.loads(config) if config else {}
    if not isinstance(kwargs, dict):
        raise SystemExit(f"--config must be a JSON object of VSSM keywords, got {config!r}")
    if not names:
        if not config:
            raise SystemExit("give --model NAME (one of the zoo, or a timm model) or --config JSON")
        return [("VSSM", lambda: VSSM(**kwargs))]

    def build(name: str) -> nn.Module:
        if name in _ZOO:
            return create_model(name, pretrained=pretrained or False, **kwargs)
        timm = _optional_import("timm", "timm", f"model {name!r} (not one of {list_models()})")
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
    mean = x.new_tensor(EVAL_CONFIG["mean"]).view(3, 1, 1)
    std = x.new_tensor(EVAL_CONFIG["std"]).view(3, 1, 1)
    return (x - mean) / std


def _read_image(path: str) -> Tensor:
    """An image file as (3, H, W) uint8."""
    Image = _optional_import("PIL.Image", "pillow", "reading images")
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
        data = _optional_import("skimage.data", "scikit-image", "sample photographs")
    except ImportError as e:
        _warn_once(f"no images given and {e}; using random inputs instead")
        return torch.rand(count, 3, size, size), "random inputs"
    names = _SAMPLE_PHOTOS[:count]
    photos = [torch.from_numpy(getattr(data, name)().copy()).permute(2, 0, 1) for name in names]
    return torch.stack([_center_crop(p, size) for p in photos]), "scikit-image: " + ", ".join(names)


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure of ``width`` x ``height`` inches; no pyplot, so no GUI backend."""
    figure = _optional_import("matplotlib.figure", "matplotlib", "plotting")
    return figure.Figure(figsize=(width, height), layout="constrained")


def _sibling(path: str, suffix: str) -> str:
    """``path`` with its extension replaced by ``suffix``: where the numbers go."""
    return os.path.splitext(path)[0] + suffix


def _write_json(path: str, data: Any) -> None:
    """JSON with NaN written as null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    with open(path, "w") as f:
        json.dump(clean(data), f, indent=1)


def _hide_axes(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _cmd_erf(args: argparse.Namespace) -> int:
    """``erf``: ERF of the centre of a stage, side by side for several models."""
    _optional_import("matplotlib", "matplotlib", "plotting")         # fail before the work
    device = _resolve_device(args.device)
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

    np = _optional_import("numpy", "numpy", "writing arrays")
    np.savez_compressed(_sibling(args.out, ".npz"), **{label: erf.numpy() for label, erf, _ in results})
    _write_json(_sibling(args.out, ".json"), dict(
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
    _optional_import("matplotlib", "matplotlib", "plotting")         # fail before the work
    device = _resolve_device(args.device)
    if args.model and "," in args.model:
        raise SystemExit("activations takes one model")
    (label, build), = _analysis_models(args.model, args.config, args.pretrained)
    torch.manual_seed(0)
    model = build().to(device).eval()
    if not isinstance(model, VSSM):
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

    _write_json(_sibling(args.out, ".json"), dict(
        model=label, image=source, size=args.size, pretrained=bool(args.pretrained),
        activation_maps=[m.tolist() for m in maps],
        attention=dict(stage=stage, block=block, query=list(query), map_size=[h, w],
                       scans=per_scan.tolist(), all_scans=combined.tolist())))
    print(f"wrote {args.out} and {_sibling(args.out, '.json')}")
    return 0


def _cmd_scaling(args: argparse.Namespace) -> int:
    """``scaling``: latency, throughput and peak memory against resolution."""
    _optional_import("matplotlib", "matplotlib", "plotting")         # fail before the work
    device = _resolve_device(args.device)
    rows = []
    print(f"scaling: device {device}, batch {args.batch}, median of {args.repeats} after {args.warmup} "
          f"warm-up, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for label, build in _analysis_models(args.model, args.config, None):
        torch.manual_seed(0)
        model = build().to(device).eval()
        for size in args.sizes:
            row = dict(model=label, size=size, pixels=size * size, batch=args.batch, device=str(device))
            try:
                x = torch.randn(args.batch, 3, size, size, device=device)
                row.update(measure_forward(model, x, args.repeats, args.warmup, memory=not args.no_memory))
            except (RuntimeError, MemoryError) as e:  # out of memory at this size: record, go on
                _warn_once(f"{label} at {size} px failed: {type(e).__name__}: {str(e)[:200]}")
                row.update(latency_ms=float("nan"), throughput=float("nan"), peak_mem_mib=float("nan"))
            rows.append(row)
            print(f"  {label:24s} {size:5d} px  {row['latency_ms']:10.1f} ms  {row['throughput']:9.2f} img/s"
                  f"  {row['peak_mem_mib']:9.1f} MiB")
        del model

    columns = ["model", "size", "pixels", "batch", "device", "latency_ms", "throughput", "peak_mem_mib"]
    with open(_sibling(args.out, ".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    figure = _new_figure(13.5, 4.2)
    axes = figure.subplots(1, 3)
    metrics = (("latency_ms", "latency (ms)"), ("throughput", "throughput (images/s)"),
               ("peak_mem_mib", "peak memory of a forward (MiB)"))
    labels = list(dict.fromkeys(r["model"] for r in rows))
    for ax, (key, title) in zip(axes, metrics):
        for label in labels:
            pts = [(r["pixels"], r[key]) for r in rows if r["model"] == label and r[key] > 0]   # drops NaN
            if pts:
                slope = loglog_slope([p[0] for p in pts], [p[1] for p in pts])
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label=f"{label}  (∝ pixels^{slope:.2f})")
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


def _int_list(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _add_analysis_commands(commands: Any) -> None:
    """Register ``erf``, ``activations`` and ``scaling`` on the main parser's subparsers."""
    def common(p: argparse.ArgumentParser, model_help: str, pretrained: bool = True) -> None:
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
        p.add_argument("--out", required=True, help="PNG file to write; the numbers go next to it")
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
        "not depend on them). Log-log plots with the fitted exponent against the pixel count; "
        "the table goes to a .csv next to the PNG. Peak memory: on CUDA max_memory_allocated "
        "beyond what was allocated before; on CPU the growth of the process's peak resident "
        "set (Linux) during one forward pass.")
    common(p, models, pretrained=False)
    p.add_argument("--sizes", type=_int_list, default=[224, 384, 512, 768, 1024],
                   help="comma-separated resolutions (default: 224,384,512,768,1024)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed forward passes per point (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forward passes first (default: 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.set_defaults(run=_cmd_scaling)


# ----------------------------------------------------------------------------------------
# Command line: ``python vmamba.py`` runs an offline smoke test of this file.


def _smoke(args: argparse.Namespace) -> int:
    """Build each model, run forward and backward, compare every backend with torch."""
    device = _resolve_device(args.device)
    names = args.model.split(",") if args.model else list_models()
    rows, failures = [], 0
    for name in names:
        row = dict(model=name, params="-", output="-", backend="torch", time="-", status="ok")
        try:
            torch.manual_seed(0)
            model = create_model(name, pretrained=args.pretrained or False).to(device)
            row["params"] = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"
            x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
            set_backend("torch")
            start = time.perf_counter()
            out = model(x)
            out.float().square().mean().backward()
            row["time"] = f"{(time.perf_counter() - start) * 1e3:.0f} ms"
            row["output"] = "x".join(map(str, out.shape))
            no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
            if not out.isfinite().all() or no_grad:
                raise RuntimeError(f"non-finite output or gradient missing for {no_grad[:3]}")
            model.eval()
            with torch.no_grad():
                ref = model(x).float()
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
    print(f"vmamba.py smoke test: torch {torch.__version__}, device {device}, "
          f"{args.batch}x3x{args.img_size}x{args.img_size}, forward + backward, random weights"
          if not args.pretrained else f"pretrained={args.pretrained}")
    _print_table(rows, ["model", "params", "output", "time", "backend", "status"])
    print("all ok" if not failures else f"{failures} model(s) failed")
    return 1 if failures else 0


def _timm_model(name: str, size: int) -> nn.Module:
    timm = _optional_import("timm", "timm", f"--compare {name}")
    try:
        return timm.create_model(name, pretrained=False, img_size=size)
    except TypeError:  # models without a fixed input size take no img_size
        return timm.create_model(name, pretrained=False)


def _bench_rows(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Median/min/max latency of each model at each size, runs interleaved round-robin."""
    device = _resolve_device(args.device)
    names = [(n, "vmamba") for n in args.model.split(",")]
    names += [(n, "timm") for n in args.compare.split(",")] if args.compare else []
    train = args.mode == "train"
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        x = torch.randn(args.batch, 3, size, size, device=device)
        models = {}
        for name, kind in names:
            torch.manual_seed(0)
            model = create_model(name) if kind == "vmamba" else _timm_model(name, size)
            models[name] = model.to(device).train(train)

        def step(model: nn.Module) -> None:
            if train:
                model(x).float().square().mean().backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode():
                    model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        times: Dict[str, List[float]] = {name: [] for name in models}
        for i in range(args.warmup + args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                step(model)
                if i >= args.warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
        base = None
        for name, kind in names:
            t = sorted(times[name])
            median = statistics.median(t)
            base = median if kind == "timm" and base is None else base
            rows.append(dict(model=name, size=size, batch=args.batch, mode=args.mode, device=str(device),
                             threads=torch.get_num_threads(), median_ms=round(median, 2),
                             min_ms=round(t[0], 2), max_ms=round(t[-1], 2), ratio=None))
        for row in rows[-len(names):]:
            row["ratio"] = round(row["median_ms"] / base, 3) if base else "-"
    return rows


def _bench(args: argparse.Namespace) -> int:
    """Time models side by side in one run and print (and optionally save) the table."""
    torch.set_num_threads(args.threads)
    rows = _bench_rows(args)
    compared = args.compare.split(",")[0] if args.compare else None
    print(f"vmamba.py bench: torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
          f"{args.mode}, median of {args.repeats} after {args.warmup} warm-up runs, interleaved"
          + (f"; ratio = median / {compared}'s" if compared else ""))
    _print_table(rows, ["model", "size", "median_ms", "min_ms", "max_ms", "ratio"])
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _scan_loop(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor) -> Tensor:
    """The obvious selective scan: one step per position, vectorised over batch, channels
    and state, stepping with unbind (the baseline of ``bench --scan``)."""
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


def _bench_scan(args: argparse.Namespace) -> int:
    """Time the torch selective scan against the per-position loop, interleaved."""
    torch.set_num_threads(args.threads)
    rows = []
    for D, N, H, backward in ((96, 1, 56, False), (96, 1, 56, True), (192, 16, 56, False)):
        g = torch.Generator().manual_seed(0)
        L, KD = H * H, 4 * D
        u, delta = torch.randn(1, KD, L, generator=g), torch.randn(1, KD, L, generator=g) - 2
        A = -torch.rand(KD, N, generator=g) * 4 - 0.1
        B, C = torch.randn(1, 4, N, L, generator=g), torch.randn(1, 4, N, L, generator=g)
        Dv, bias = torch.randn(KD, generator=g), torch.randn(KD, generator=g) * 0.1
        x = torch.randn(1, H, H, D, generator=g)
        ss2d = (x, torch.randn(1, H, H, 4, D, generator=g) - 2, A.view(4, D, N), torch.randn(1, H, H, 4, N, generator=g),
                torch.randn(1, H, H, 4, N, generator=g), Dv.view(4, D), bias.view(4, D))
        cases = {"loop (unbind)": (_scan_loop, (u, delta, A, B, C, Dv, bias)),
                 "selective_scan(backend='torch')": (_selective_scan_torch, (u, delta, A, B, C, Dv, bias)),
                 "fused SS2D scan (dt given per pixel)": (_ss2d_scan_torch, ss2d)}

        def run(fn: Callable, inputs: Tuple[Tensor, ...]) -> None:
            if not backward:
                with torch.no_grad():
                    fn(*inputs)
                return
            inputs = [t.clone().requires_grad_() for t in inputs]
            fn(*inputs).sum().backward()

        times: Dict[str, List[float]] = {name: [] for name in cases}
        for i in range(args.warmup + args.repeats):
            for name, (fn, inputs) in cases.items():
                start = time.perf_counter()
                run(fn, inputs)
                if i >= args.warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
        base = statistics.median(times["loop (unbind)"])
        for name, t in times.items():
            rows.append(dict(case=f"K=4 D={D} N={N} L={L} {'fwd+bwd' if backward else 'fwd'}", scan=name,
                             median_ms=round(statistics.median(t), 2), min_ms=round(min(t), 2),
                             speedup=round(base / statistics.median(t), 2)))
    print(f"vmamba.py bench --scan: torch {torch.__version__}, {args.threads} threads, batch 1, "
          f"median of {args.repeats} after {args.warmup} warm-up runs, interleaved; speedup = loop / scan")
    _print_table(rows, ["case", "scan", "median_ms", "min_ms", "speedup"])
    return 0


def _add_bench_command(commands: Any) -> None:
    bench = commands.add_parser("bench", help="latency of models side by side (median, min, max, ratio)",
                                description="Latency of vmamba models, and of timm models with --compare, "
                                "measured interleaved in one run. Ratios are to the first --compare model.")
    bench.add_argument("--model", default="vmamba_tiny_s1l8", help="comma-separated zoo names")
    bench.add_argument("--sizes", default="224", help="comma-separated resolutions (default: 224)")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--threads", type=int, default=torch.get_num_threads(),
                       help=f"torch threads (default: {torch.get_num_threads()})")
    bench.add_argument("--mode", choices=("infer", "train"), default="infer",
                       help="infer: eval forward; train: forward + backward in train mode")
    bench.add_argument("--repeats", type=int, default=10)
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    bench.add_argument("--compare", default=None, metavar="NAME[,NAME]", help="timm models to time alongside")
    bench.add_argument("--csv", default=None, metavar="PATH", help="also write the table as CSV")
    bench.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON")
    bench.add_argument("--scan", action="store_true",
                       help="instead of models, time the torch selective scan against a per-position loop")
    bench.set_defaults(run=lambda a: _bench_scan(a) if a.scan else _bench(a))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vmamba.py", description="VMamba in one file. Without a command: an offline smoke test "
        "that builds the zoo models, runs forward and backward and compares every available backend.")
    parser.add_argument("--model", default=None, help=f"comma-separated model names (default: all of {list_models()})")
    parser.add_argument("--img-size", type=int, default=64, help="input resolution (default: 64)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="PATH_OR_URL",
                        help="load the released weights (needs network), or the given file/URL")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_bench_command(commands)
    p = commands.add_parser("flops", help="params and GFLOPs of the zoo beside the published table",
                            description="Params and GFLOPs (multiply-adds; 9*L*D*N per selective scan) "
                            "of zoo models, counted without weights or downloads.")
    p.add_argument("--model", default=None, help="comma-separated zoo names (default: all)")
    p.add_argument("--size", type=int, default=224, help="input resolution (default: 224)")
    p.set_defaults(run=_cmd_flops)
    _add_analysis_commands(commands)
    args = parser.parse_args(argv)
    if args.command is None:
        return _smoke(args)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
