"""Small helpers shared by the scripts in tools/: devices, optional imports, tables, files.

Each script puts the repository root (for ``import vmamba``) and this folder on
``sys.path`` before importing this module, so it works both as ``python tools/X.py``
and when a test imports the script.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import warnings
from typing import Any, Dict, List, Sequence

import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU) or a torch device name; fails clearly
    when CUDA is asked for on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def optional_import(module: str, package: str, purpose: str) -> Any:
    """Import an optional dependency, or raise ImportError naming its pip install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{purpose} needs {package}; install it with: pip install {package}") from e


def warn_once(message: str, _seen: set = set()) -> None:
    """A warning shown once per process for each distinct message."""
    if message not in _seen:
        _seen.add(message)
        warnings.warn(message, stacklevel=2)


def print_table(rows: List[Dict[str, Any]], columns: Sequence[str]) -> None:
    """Print ``rows`` as left-aligned columns under a header line."""
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)))


def int_list(text: str) -> List[int]:
    """An argparse type: comma-separated integers, e.g. ``224,512``."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def write_csv(path: str, rows: List[Dict[str, Any]], columns: Sequence[str] = ()) -> None:
    """``rows`` as CSV with a header: ``columns``, or the keys of the first row."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns or rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: str, data: Any) -> None:
    """``data`` as indented JSON, with NaN and infinities written as null."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    with open(path, "w") as f:
        json.dump(clean(data), f, indent=1)
