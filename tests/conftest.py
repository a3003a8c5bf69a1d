"""Shared test fixtures: the contract data in tests/data.

``v0_square.pt`` and ``v2_ln2d_square.pt`` are small models computed with the authors'
implementation on CPU (config, state_dict, input, output); ``zoo_state_dict.json`` holds
every released checkpoint's keys, shapes and parameter count.
"""
import contextlib
import functools
import http.server
import os
import sys
import threading
import weakref
from pathlib import Path

# One intra-op thread unless OMP_NUM_THREADS says otherwise (set before torch starts, so that
# subprocesses inherit it too). The tests run tiny models, which more threads only slow down: on
# a busy 2-core runner, a thread waiting for a core made some tests 10 to 50 times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))   # in case torch was imported first

# Triton kernels run on CPU under the interpreter, which must be chosen before they are
# defined (at import of vmamba). The "auto" backend on CPU stays pure PyTorch regardless.
os.environ.setdefault("TRITON_INTERPRET", "1")


def _helpers_without_repatching():
    """The interpreter patches the triton.language modules a kernel's globals hold when the kernel starts, and again
    at every call of a jit helper inside it (an inspect.getmembers over the language: ~1 ms a call, most of an
    interpreted fused kernel's time), which nothing undoes before the kernel ends. Here a helper call repeats it only
    for globals (a module: vmamba's, triton's standard library) not patched yet in the running kernel; the rest of
    the repeats set what is set already. Where triton's interpreter is laid out otherwise, nothing is changed."""
    try:
        from triton.runtime import interpreter
        launch, helper_call = interpreter.GridExecutor.__call__, interpreter.InterpretedFunction.__call__
        patch, running = interpreter._patch_lang, []
    except (ImportError, AttributeError):
        return

    def run_kernel(self, *args, **kwargs):
        running.append({id(self.fn.__globals__)})   # the globals patched in this kernel
        try:
            return launch(self, *args, **kwargs)
        finally:
            running.pop()

    def call_helper(self, *args, **kwargs):
        previous, done = interpreter._patch_lang, bool(running) and id(self.fn.__globals__) in running[-1]
        if running:
            running[-1].add(id(self.fn.__globals__))
        interpreter._patch_lang = (lambda fn: None) if done else patch
        try:
            return helper_call(self, *args, **kwargs)
        finally:
            interpreter._patch_lang = previous

    interpreter.GridExecutor.__call__, interpreter.InterpretedFunction.__call__ = run_kernel, call_helper


_helpers_without_repatching()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(__file__).resolve().parent / "data"

FIXTURES = ["v0_square", "v2_ln2d_square"]


def data_file(name: str) -> Path:
    """A file of the contract data in tests/data (part of the repository)."""
    return DATA / name


@contextlib.contextmanager
def serve_folder(root):
    """A real HTTP server on 127.0.0.1 serving the files of ``root``; yields its base URL (no trailing slash)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args, **kwargs: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class PeakBytes(TorchFunctionMode):
    """Counts the storages that torch functions return while active, except those of ``given`` tensors, each until
    it is freed: ``peak`` is the most bytes alive at once (exact, unlike the process's resident set)."""

    def __init__(self, *given):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, {t.untyped_storage().data_ptr() for t in given}

    def _freed(self, key, nbytes):
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            storage = t.untyped_storage() if isinstance(t, torch.Tensor) else None
            if storage is not None and storage.data_ptr() not in self.seen:
                self.seen.add(storage.data_ptr())
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, storage.data_ptr(), storage.nbytes())
        return out


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pytest.ini): a worker per core, at most 4 (each holds torch and its own Triton and inductor
    caches; the tests are single-threaded, see OMP_NUM_THREADS above)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 4))


def pytest_collection_modifyitems(config, items):
    """``-m quick``: the tests that neither compile, nor interpret Triton kernels, nor benchmark."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in ("compile", "triton", "slow")):
            item.add_marker(pytest.mark.quick)


@pytest.fixture(params=FIXTURES)
def fixture(request):
    """One reference computation of the authors' implementation."""
    return torch.load(data_file(f"{request.param}.pt"), weights_only=True)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
