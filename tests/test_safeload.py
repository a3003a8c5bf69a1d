"""Checkpoint files are read without running their code; downloads are atomic and verified;
safetensors files are read and written.

Everything runs on 127.0.0.1: no network access."""

import argparse
import builtins
import contextlib
import hashlib
import http.server
import importlib.util
import io
import os
import pickle
import socket
import sys
import tarfile
import threading
import time
import types
import zipfile
from collections import OrderedDict

import pytest
import torch

import vmamba
from vmamba import PickledObject, download_cached, load_checkpoint_file, save_weights


# ---------------------------------------------------------------------------
# Helpers for checkpoint tests
# ---------------------------------------------------------------------------

_CFGNODE_SOURCE = '''
class CfgNode(dict):
    """The shape of yacs' CfgNode: a dict whose nested dicts are CfgNodes, with attributes in __dict__."""

    def __init__(self, init_dict=None, new_allowed=False):
        init_dict = dict(init_dict or {})
        for key, value in init_dict.items():
            if type(value) is dict:
                init_dict[key] = CfgNode(value)
        super().__init__(init_dict)
        self.__dict__["__immutable__"] = False
        self.__dict__["__deprecated_keys__"] = set()
        self.__dict__["__new_allowed__"] = new_allowed
'''


@contextlib.contextmanager
def fake_module(name, source):
    """Import ``name`` (e.g. "yacs.config") from ``source`` while saving; gone afterwards, as on a user's machine."""
    prefixes = [".".join(name.split(".")[: i + 1]) for i in range(name.count(".") + 1)]
    saved = {prefix: sys.modules.get(prefix) for prefix in prefixes}   # a real one, if installed, comes back
    for prefix in prefixes:
        sys.modules[prefix] = types.ModuleType(prefix)
    exec(source, sys.modules[name].__dict__)
    try:
        yield sys.modules[name]
    finally:
        for prefix, module in saved.items():
            if module is None:
                del sys.modules[prefix]
            else:
                sys.modules[prefix] = module


class Payload:
    """Pickles as ``func(*args)``: what a malicious checkpoint would run."""

    def __init__(self, func, *args):
        self.func = func
        self.args = args

    def __reduce__(self):
        return (self.func, self.args)


class CallablePayload(Payload):
    """A payload whose unpickled result is then called (chained REDUCE)."""

    def __call__(self, *args):  # only so that pickle accepts it as a callable
        raise AssertionError("never called while pickling")


def small_state_dict():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    return model, model.state_dict()


def assert_state_dicts_equal(loaded, expected):
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "pickled payload was executed"


def assert_refused(path, *names):
    """load_checkpoint_file refuses ``path``, listing the globals ``names`` and how a trusting user loads it."""
    with pytest.raises(ValueError) as excinfo:
        load_checkpoint_file(path)
    message = str(excinfo.value)
    assert str(path) in message and "could not be read as a PyTorch checkpoint" in message
    for name in names:
        assert name in message
    if names:
        assert "If you trust the file" in message and "weights_only=False" in message
    return message


# ---------------------------------------------------------------------------
# load_checkpoint_file: the released checkpoints' contents
# ---------------------------------------------------------------------------


def training_checkpoint():
    """Shaped like a released checkpoint: weights, AdamW state, scheduler state, epoch, accuracy, yacs config."""
    _, state_dict = small_state_dict()
    exp_avg = torch.randn(3, 4)
    optimizer_state = {
        "state": {0: {"step": torch.tensor(1.0), "exp_avg": exp_avg}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}],
    }
    checkpoint = {
        "model": state_dict,
        "optimizer": optimizer_state,
        "lr_scheduler": {"t_initial": 300, "warmup_t": 20, "base_values": [1e-3]},
        "max_accuracy": 82.6,
        "epoch": 3,
        "args": argparse.Namespace(lr=0.1, batch_size=128),
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    return checkpoint, state_dict, optimizer_state


def save_with_config(checkpoint, path, **kwargs):
    """torch.save ``checkpoint`` with a yacs config under "config" (pickled while yacs is importable)."""
    with fake_module("yacs.config", _CFGNODE_SOURCE) as module:
        checkpoint = dict(checkpoint, config=module.CfgNode({"MODEL": {"TYPE": "vssm", "DEPTHS": [2, 2, 9, 2]}}))
        torch.save(checkpoint, path, **kwargs)


def test_training_checkpoint_with_metadata_loads(tmp_path):
    checkpoint, state_dict, optimizer_state = training_checkpoint()
    exp_avg = optimizer_state["state"][0]["exp_avg"]
    path = tmp_path / "ckpt.pth"
    yacs_before = sys.modules.get("yacs.config")   # None unless yacs is installed and imported
    save_with_config(checkpoint, path)

    loaded = load_checkpoint_file(path)

    assert_state_dicts_equal(loaded["model"], state_dict)
    assert loaded["epoch"] == 3 and loaded["max_accuracy"] == 82.6
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], exp_avg)
    assert loaded["optimizer"]["param_groups"] == optimizer_state["param_groups"]
    assert isinstance(loaded["param"], torch.nn.Parameter)

    config = loaded["config"]   # the yacs config reads as the dict it is
    assert type(config) is OrderedDict and type(config["MODEL"]) is OrderedDict
    assert config["MODEL"]["DEPTHS"] == [2, 2, 9, 2]
    assert config.__dict__["__immutable__"] is False
    assert sys.modules.get("yacs.config") is yacs_before   # nothing was imported

    args = loaded["args"]
    assert isinstance(args, PickledObject) and args.global_name == "argparse.Namespace"
    assert args.state == {"lr": 0.1, "batch_size": 128}
    assert repr(args) == "<PickledObject argparse.Namespace>"

    # Nothing the load allowlisted for itself stays allowlisted.
    assert not any(isinstance(g, tuple) and g[1] == "yacs.config.CfgNode"
                   for g in torch.serialization.get_safe_globals())
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_legacy_checkpoint_reads_known_globals_and_refuses_others(tmp_path):
    checkpoint, state_dict, _ = training_checkpoint()
    path = tmp_path / "ckpt.pth"
    save_with_config(checkpoint, path, _use_new_zipfile_serialization=False)
    loaded = load_checkpoint_file(path)
    assert_state_dicts_equal(loaded["model"], state_dict)
    assert loaded["config"]["MODEL"]["TYPE"] == "vssm" and loaded["args"].state == {"lr": 0.1, "batch_size": 128}

    torch.save(dict(checkpoint, norm=torch.nn.LayerNorm), path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="legacy non-zip format") as excinfo:
        load_checkpoint_file(path)
    assert str(path) in str(excinfo.value) and "torch.nn.modules.normalization.LayerNorm" in str(excinfo.value)
    assert "will likely succeed" not in str(excinfo.value)


def test_numpy_metadata_becomes_placeholders(tmp_path):
    np = pytest.importorskip("numpy")
    _, state_dict = small_state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state_dict, "best_acc": np.float64(81.2), "history": np.arange(3.0)}, path)
    loaded = load_checkpoint_file(path)
    assert_state_dicts_equal(loaded["model"], state_dict)
    best, history = loaded["best_acc"], loaded["history"]
    assert isinstance(best, PickledObject) and best.global_name.endswith("multiarray.scalar")
    assert isinstance(best.args[0], PickledObject) and best.args[0].global_name == "numpy.dtype"
    assert isinstance(history, PickledObject) and history.global_name.endswith("multiarray._reconstruct")
    assert history.state[1] == (3,)   # (version, shape, dtype, fortran order, raw data)


def test_mmengine_log_buffer_becomes_placeholder(tmp_path):
    """Detection/segmentation checkpoints (mmengine) keep their log history in HistoryBuffer objects."""
    source = "class HistoryBuffer:\n    def __init__(self):\n        self.max_length = 1000000\n"
    _, state_dict = small_state_dict()
    path = tmp_path / "det.pth"
    with fake_module("mmengine.logging.history_buffer", source) as module:
        torch.save({"state_dict": {"backbone." + k: v for k, v in state_dict.items()},
                    "message_hub": {"log_scalars": {"train/loss": module.HistoryBuffer()}}}, path)
    loaded = load_checkpoint_file(path)
    buffer = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert buffer.global_name == "mmengine.logging.history_buffer.HistoryBuffer"
    assert buffer.state == {"max_length": 1000000}
    assert "mmengine.logging.history_buffer" not in sys.modules or importlib.util.find_spec("mmengine")


def test_other_globals_are_refused_before_unpickling(tmp_path):
    _, state_dict = small_state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state_dict, "norm_layer": torch.nn.LayerNorm, "cfg": argparse.Namespace(a=1)}, path)
    message = assert_refused(path, "torch.nn.modules.normalization.LayerNorm")
    assert "argparse.Namespace" not in message   # the known one is not listed


def test_module_named_by_a_global_is_never_imported(tmp_path):
    name = "vmamba_safeload_probe_module"
    module = types.ModuleType(name)
    exec("class Config:\n    def __init__(self):\n        self.lr = 0.5\n", module.__dict__)
    sys.modules[name] = module
    try:
        _, state_dict = small_state_dict()
        path = tmp_path / "ckpt.pth"
        torch.save({"model": state_dict, "config": module.Config()}, path)
    finally:
        del sys.modules[name]
    (tmp_path / f"{name}.py").write_text("import pathlib\npathlib.Path(__file__).with_name('imported').touch()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert_refused(path, f"{name}.Config")
    finally:
        sys.path.remove(str(tmp_path))
    assert name not in sys.modules and not (tmp_path / "imported").exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_plain_state_dict_loads(tmp_path, zip_format):
    _, state_dict = small_state_dict()
    path = tmp_path / "weights.pth"
    torch.save(state_dict, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_checkpoint_file(str(path))
    assert isinstance(loaded, OrderedDict)
    assert_state_dicts_equal(loaded, state_dict)


# ---------------------------------------------------------------------------
# load_checkpoint_file: malicious checkpoints
# ---------------------------------------------------------------------------


def malicious_payloads(marker):
    command = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    import_os = Payload(builtins.__import__, "os")
    return {
        "os.system": Payload(os.system, command),
        "exec": Payload(builtins.exec, code),
        "eval": Payload(builtins.eval, code),
        "open": Payload(builtins.open, str(marker), "w"),
        # getattr(__import__("os"), "system")("touch ...")
        "chained": Payload(
            CallablePayload(builtins.getattr, import_os, "system"), command
        ),
    }


_PAYLOAD_GLOBALS = {"os.system": f"{os.system.__module__}.system", "exec": "builtins.exec", "eval": "builtins.eval",
                    "open": f"{open.__module__}.open", "chained": "builtins.getattr"}


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload_name", sorted(_PAYLOAD_GLOBALS))
def test_malicious_payload_is_not_executed(tmp_path, marker, payload_name, zip_format):
    _, state_dict = small_state_dict()
    payload = malicious_payloads(marker)[payload_name]
    path = tmp_path / "evil.pth"
    torch.save({"model": state_dict, "evil": payload}, path, _use_new_zipfile_serialization=zip_format)
    if zip_format:
        assert_refused(path, _PAYLOAD_GLOBALS[payload_name])
    else:
        with pytest.raises(ValueError, match="legacy non-zip format"):
            load_checkpoint_file(path)
    assert not marker.exists()


def test_malicious_payloads_nested_anywhere_are_all_listed(tmp_path, marker):
    _, state_dict = small_state_dict()
    payloads = malicious_payloads(marker)
    checkpoint = {
        "model": dict(state_dict, evil=payloads["open"]),
        "meta": {"history": [1, 2, {"hook": payloads["os.system"]}]},
        "extra": {"a": (payloads["exec"], payloads["eval"])},
    }
    path = tmp_path / "evil.pth"
    torch.save(checkpoint, path)
    assert_refused(path, "builtins.exec", "builtins.eval", f"{open.__module__}.open", f"{os.system.__module__}.system")


def zip_checkpoint_with_pickle(path, data):
    """A torch.save zip archive whose data.pkl is replaced by ``data``."""
    buffer = io.BytesIO()
    torch.save({}, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            archive.writestr(info, data if info.filename.endswith("/data.pkl") else source.read(info))
    return path


# Raw protocol-2 pickles exercising opcodes a torch.save payload cannot emit.
_RAW_ATTACKS = {
    # BUILD on an allowlisted class would setattr() on torch.nn.Parameter.
    "build-on-class": (
        b"\x80\x02ctorch.nn.parameter\nParameter\n"
        b"N}X\x0e\x00\x00\x00safeload_pwnedK\x01s\x86b."
    ),
    # SETITEM on an allowlisted class object.
    "setitem-on-class": (
        b"\x80\x02ctorch.nn.parameter\nParameter\nX\x01\x00\x00\x00aK\x01s."
    ),
    # APPEND to a tensor.
    "append-to-tensor": b"\x80\x02ctorch\nTensor\n)RK\x01a.",
    # REDUCE with a non-allowlisted callable (a tensor).
    "call-tensor": b"\x80\x02ctorch\nTensor\n)R)R.",
    # copyreg extension registry lookup.
    "extension": b"\x80\x02\x82\x01.",
    # Persistent ids other than tensor storages.
    "persid-other": b"\x80\x02X\x05\x00\x00\x00otherK\x01\x86Q.",
    "persid-string": b"\x80\x02Pfoo\n.",
    # BUILD on a stand-in class itself (not on an instance), with slot state.
    "build-on-stand-in-class": b"\x80\x02cargparse\nNamespace\nN}X\x01\x00\x00\x00kK\x01s\x86b.",
    # SETITEM into a stand-in instance (only dicts take items).
    "setitem-into-stand-in": b"\x80\x02cargparse\nNamespace\n)RX\x01\x00\x00\x00kK\x01s.",
    # APPEND to a stand-in instance (only lists take items).
    "append-to-stand-in": b"\x80\x02cargparse\nNamespace\n)RK\x01a.",
    # STACK_GLOBAL (protocol 4) names a global the static scan cannot see.
    "stack-global": b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x8c\x02id\x85R.",
}


@pytest.mark.parametrize("name", sorted(_RAW_ATTACKS))
def test_raw_pickle_side_effects_are_refused(tmp_path, name):
    path = zip_checkpoint_with_pickle(tmp_path / "evil.pth", _RAW_ATTACKS[name])
    with pytest.raises(ValueError, match="could not be read as a PyTorch checkpoint") as excinfo:
        load_checkpoint_file(path)
    assert "will likely succeed" not in str(excinfo.value)   # torch's advice to load unsafely is not passed on
    assert not hasattr(torch.nn.Parameter, "safeload_pwned")
    assert not hasattr(torch.nn.Parameter, "a")
    assert not hasattr(argparse.Namespace, "k")


@pytest.mark.parametrize("module", ["sys", "os", "posix", "nt", "builtins"])
def test_globals_of_any_module_are_refused_by_name(tmp_path, module):
    data = (b"\x80\x02}(X\x05\x00\x00\x00modelK\x01X\x04\x00\x00\x00evilc" + module.encode()
            + b"\nsystem\nX\x02\x00\x00\x00id\x85Ru.")
    path = zip_checkpoint_with_pickle(tmp_path / "evil.pth", data)
    assert_refused(path, f"{module}.system")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_whole_module_pickle_is_refused(tmp_path, zip_format):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 3), path, _use_new_zipfile_serialization=zip_format)
    if zip_format:
        assert_refused(path, "torch.nn.modules.linear.Linear")
    else:
        with pytest.raises(ValueError, match="legacy non-zip format"):
            load_checkpoint_file(path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_sparse_tensors_are_validated(tmp_path, zip_format):
    indices = torch.tensor([[0, 2]])
    values = torch.tensor([1.0, 2.0])
    good = torch.sparse_coo_tensor(indices, values, (3,), check_invariants=True)
    path = tmp_path / "sparse.pth"
    if zip_format:
        torch.save({"s": good, "cfg": argparse.Namespace(a=1)}, path)
        assert torch.equal(load_checkpoint_file(path)["s"].to_dense(), good.to_dense())

    # Out-of-bounds index: using it could read out of bounds, so loading fails.
    bad = torch.sparse_coo_tensor(indices * 50, values, (3,), check_invariants=False)
    torch.save({"s": bad, "cfg": argparse.Namespace(a=1)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint_file(path)

    # The failed load leaves nothing behind that would fail the next one.
    other = tmp_path / "other.pth"
    torch.save({"s": good}, other)
    assert torch.equal(load_checkpoint_file(other)["s"].to_dense(), good.to_dense())
    assert torch.equal(torch.load(other, weights_only=True)["s"].to_dense(), good.to_dense())


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("scripted/data.pkl", pickle.dumps({}, protocol=2))
        archive.writestr("scripted/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("scripted/version", "3\n")
    with pytest.raises(ValueError, match="(?i)could not be read.*TorchScript"):
        load_checkpoint_file(path)


def test_legacy_tar_checkpoint_is_refused(tmp_path):
    path = tmp_path / "old.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            payload = pickle.dumps({}, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match="could not be read.*not a checkpoint"):
        load_checkpoint_file(path)


# ---------------------------------------------------------------------------
# load_checkpoint_file: error handling
# ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError) as excinfo:
        load_checkpoint_file(path)
    assert str(path) in str(excinfo.value)


def test_directory(tmp_path):
    with pytest.raises((IsADirectoryError, ValueError)) as excinfo:
        load_checkpoint_file(tmp_path)
    assert str(tmp_path) in str(excinfo.value)


def _write_text(path):
    path.write_text("this is not a checkpoint\n" * 10)


def _write_empty(path):
    path.write_bytes(b"")


def _write_truncated_zip(path):
    _, state_dict = small_state_dict()
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _write_truncated_legacy(path):
    _, state_dict = small_state_dict()
    buffer = io.BytesIO()
    torch.save(state_dict, buffer, _use_new_zipfile_serialization=False)
    path.write_bytes(buffer.getvalue()[:-40])


def _write_random_pickle(path):
    path.write_bytes(pickle.dumps({"not": "a checkpoint"}, protocol=2))


@pytest.mark.parametrize(
    "writer",
    [_write_text, _write_empty, _write_truncated_zip, _write_truncated_legacy, _write_random_pickle],
    ids=["text", "empty", "truncated-zip", "truncated-legacy", "plain-pickle"],
)
def test_unreadable_file_raises_value_error(tmp_path, writer):
    path = tmp_path / "bad.pth"
    writer(path)
    with pytest.raises(ValueError, match="could not be read as a PyTorch checkpoint") as excinfo:
        load_checkpoint_file(path)
    assert str(path) in str(excinfo.value)
    assert excinfo.value.__cause__ is not None


# ---------------------------------------------------------------------------
# download_cached
# ---------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.body`` at every path; behaviour set by ``server.mode``."""

    def do_GET(self):
        server = self.server
        server.requests.append(self.path)
        body = server.body
        if server.mode == "404":
            self.send_error(404, "File not found")
        elif server.mode == "500":
            self.send_error(500, "Internal error")
        elif server.mode == "slow":
            time.sleep(1.0)  # longer than the client's timeout; then hang up
            self.close_connection = True
        else:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if server.mode == "truncate":
                # Promise len(body) bytes, send half, close the connection.
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
            else:
                self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    _, state_dict = small_state_dict()
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.requests = []
    httpd.body = buffer.getvalue()
    httpd.mode = "ok"
    httpd.state_dict = state_dict
    httpd.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _files(directory):
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def _name(url):
    return vmamba._cache_file_name(url)


def test_download_then_cache_hit(server, tmp_path):
    cache_dir = tmp_path / "cache"
    url = f"{server.base_url}/release/vssm_tiny.pth"

    path = download_cached(url, cache_dir=cache_dir, progress=True)

    assert path == os.path.join(cache_dir, _name(url))
    with open(path, "rb") as file:
        assert file.read() == server.body
    assert server.requests == ["/release/vssm_tiny.pth"]
    assert _files(cache_dir) == [_name(url)]
    assert_state_dicts_equal(load_checkpoint_file(path), server.state_dict)

    assert download_cached(url, cache_dir=str(cache_dir), progress=False) == path
    assert len(server.requests) == 1


def test_default_cache_dir_is_torch_hub(server, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    url = f"{server.base_url}/w.pth"
    path = download_cached(url, progress=False)
    assert path == str(tmp_path / "hub" / "checkpoints" / _name(url))
    assert os.path.isfile(path)


@pytest.mark.parametrize("prefix_len", [64, 8], ids=["full", "prefix"])
def test_sha256_good(server, tmp_path, prefix_len):
    digest = hashlib.sha256(server.body).hexdigest()
    url = f"{server.base_url}/model.pth"
    expected = digest[:prefix_len].upper()
    path = download_cached(url, sha256=expected, progress=False, cache_dir=tmp_path)
    assert os.path.isfile(path)
    # Cached file is verified again, without a second request.
    assert download_cached(url, sha256=expected, progress=False, cache_dir=tmp_path) == path
    assert len(server.requests) == 1


def test_sha256_bad_deletes_and_raises(server, tmp_path):
    url = f"{server.base_url}/model.pth"
    actual = hashlib.sha256(server.body).hexdigest()
    wrong = "0" * 64
    with pytest.raises(ValueError) as excinfo:
        download_cached(url, sha256=wrong, progress=False, cache_dir=tmp_path)
    message = str(excinfo.value)
    assert url in message and wrong in message and actual in message
    assert _files(tmp_path) == []


def test_cached_file_with_wrong_hash_is_downloaded_again(server, tmp_path):
    url = f"{server.base_url}/model.pth"
    (tmp_path / _name(url)).write_bytes(b"stale or corrupted")
    digest = hashlib.sha256(server.body).hexdigest()
    with pytest.warns(UserWarning, match="downloading .* again"):
        path = download_cached(url, sha256=digest, progress=False, cache_dir=tmp_path)
    with open(path, "rb") as file:
        assert file.read() == server.body
    assert len(server.requests) == 1


def test_cached_and_fresh_file_both_mismatch(server, tmp_path):
    """The stale file stays (another process may be using it; a good download replaces it), and nothing else."""
    url = f"{server.base_url}/model.pth"
    (tmp_path / _name(url)).write_bytes(b"stale")
    with pytest.warns(UserWarning):
        with pytest.raises(ValueError, match="SHA-256 mismatch"):
            download_cached(url, sha256="deadbeef", progress=False, cache_dir=tmp_path)
    assert _files(tmp_path) == [_name(url)] and (tmp_path / _name(url)).read_bytes() == b"stale"
    assert len(server.requests) == 1


def _assert_offline_advice(message, url, cache_dir):
    """A failed download names the URL, the exact file to create offline and the folder, and the local-path way."""
    name = _name(url)
    assert url in message and f"save the file as {name} in {cache_dir}" in message
    assert os.path.join(cache_dir, name) in message and "pass a local path to load_pretrained" in message


@pytest.mark.parametrize("mode", ["404", "500"])
def test_http_error_names_url_and_cache_path(server, tmp_path, mode):
    server.mode = mode
    url = f"{server.base_url}/missing.pth"
    with pytest.raises(RuntimeError) as excinfo:
        download_cached(url, progress=False, cache_dir=tmp_path)
    message = str(excinfo.value)
    _assert_offline_advice(message, url, str(tmp_path))
    assert mode in message
    assert excinfo.value.__cause__ is not None
    assert _files(tmp_path) == []


def test_connection_refused(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/model.pth"
    with pytest.raises(RuntimeError) as excinfo:
        download_cached(url, progress=False, cache_dir=tmp_path)
    _assert_offline_advice(str(excinfo.value), url, str(tmp_path))
    assert isinstance(excinfo.value.__cause__, OSError)
    assert _files(tmp_path) == []


def test_server_hanging_up_without_answer(server, tmp_path):
    server.mode = "slow"
    url = f"{server.base_url}/model.pth"
    with pytest.raises(RuntimeError) as excinfo:
        download_cached(url, progress=False, cache_dir=tmp_path)
    _assert_offline_advice(str(excinfo.value), url, str(tmp_path))
    assert excinfo.value.__cause__ is not None
    assert _files(tmp_path) == []


def test_truncated_body_leaves_no_file_then_recovers(server, tmp_path):
    url = f"{server.base_url}/model.pth"
    server.mode = "truncate"
    with pytest.raises(RuntimeError, match="the connection closed early") as excinfo:
        download_cached(url, progress=False, cache_dir=tmp_path)
    assert url in str(excinfo.value)
    assert _files(tmp_path) == []  # neither final file nor .partial leftovers

    server.mode = "ok"
    path = download_cached(url, progress=False, cache_dir=tmp_path)
    with open(path, "rb") as file:
        assert file.read() == server.body
    assert _files(tmp_path) == [_name(url)]


def test_download_shows_progress(server, tmp_path, capfd):
    pytest.importorskip("tqdm")
    path = download_cached(f"{server.base_url}/w.pth", cache_dir=tmp_path, progress=True)
    assert os.path.getsize(path) == len(server.body)
    assert "100%" in capfd.readouterr().err   # tqdm's bar, as torch.hub's
    download_cached(f"{server.base_url}/v.pth", cache_dir=tmp_path, progress=False)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(
    "url_path, stem, ext",
    [
        ("/a/b/model.pth", "model", ".pth"),
        ("/a/vssm%20tiny%231.pth", "vssm_tiny_1", ".pth"),
        ("/a/evil%2F..%2Fpasswd", "evil_.._passwd", ""),
        ("/a/%2e%2e%2fetc", "_etc", ""),
        ("/a/%00nul.pth", "_nul", ".pth"),
        ("/a/m%C3%B6del.pth", "m_del", ".pth"),
    ],
)
def test_cache_file_name_is_filesystem_safe(server, tmp_path, url_path, stem, ext):
    cache_dir = tmp_path / "cache"
    url = f"{server.base_url}{url_path}?x=1#frag"
    path = download_cached(url, progress=False, cache_dir=cache_dir)
    name = os.path.basename(path)
    assert path == os.path.join(cache_dir, name) and name == _name(url)
    assert name.startswith(stem + "-") and name.endswith(ext) and len(name) == len(stem) + 13 + len(ext)
    assert _files(cache_dir) == [name] and _files(tmp_path) == ["cache"]
    assert server.requests == [f"{url_path}?x=1"]


def test_cache_file_name_is_length_limited(server, tmp_path):
    path = download_cached(f"{server.base_url}/{'a' * 500}.pth", progress=False, cache_dir=tmp_path)
    name = os.path.basename(path)
    assert len(name) <= 200 and name.endswith(".pth") and _files(tmp_path) == [name]


@pytest.mark.parametrize("url", ["https://example.com/", "https://example.com/%2e%2e"])
def test_url_without_file_name_rejected(url, tmp_path):
    with pytest.raises(ValueError, match="file name"):
        download_cached(url, cache_dir=tmp_path)


@pytest.mark.parametrize("sha256", ["abc", "xyz12345", "0" * 65])
def test_malformed_sha256_rejected(sha256, tmp_path):
    with pytest.raises(ValueError, match="sha256"):
        download_cached("https://example.com/m.pth", sha256=sha256, cache_dir=tmp_path)


def test_non_http_url_rejected(tmp_path):
    with pytest.raises(ValueError, match="http"):
        download_cached("file:///etc/passwd", cache_dir=tmp_path)


# ---------------------------------------------------------------------------
# safetensors files and save_weights
# ---------------------------------------------------------------------------


def _tiny_vssm():
    torch.manual_seed(0)
    return vmamba.VSSM(depths=[1], dims=8, num_classes=3)


def _safetensors_bytes(state_dict, tmp_path):
    path = tmp_path / "tmp.safetensors"
    save_weights(state_dict, path)
    data = path.read_bytes()
    path.unlink()
    return data


def test_safetensors_file_loads(tmp_path):
    pytest.importorskip("safetensors")
    _, state_dict = small_state_dict()
    path = tmp_path / "weights.safetensors"
    save_weights(state_dict, path)
    assert_state_dicts_equal(dict(sorted(load_checkpoint_file(path).items())), dict(sorted(state_dict.items())))
    # Recognised by content too, whatever the file is called.
    renamed = tmp_path / "weights.bin"
    path.rename(renamed)
    assert torch.equal(load_checkpoint_file(renamed)["0.weight"], state_dict["0.weight"])


def test_safetensors_file_loads_into_model(tmp_path):
    pytest.importorskip("safetensors")
    source = _tiny_vssm()
    path = tmp_path / "vssm.safetensors"
    save_weights(source, path)
    model = vmamba.load_pretrained(vmamba.VSSM(depths=[1], dims=8, num_classes=3), path)
    assert_state_dicts_equal(model.state_dict(), source.state_dict())


def test_safetensors_url_loads_into_model(server, tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    source = _tiny_vssm()
    server.body = _safetensors_bytes(source.state_dict(), tmp_path)
    url = f"{server.base_url}/release/vssm_tiny.safetensors"
    model = vmamba.load_pretrained(vmamba.VSSM(depths=[1], dims=8, num_classes=3), url, progress=False,
                                   sha256=hashlib.sha256(server.body).hexdigest())
    assert_state_dicts_equal(model.state_dict(), source.state_dict())
    assert _files(tmp_path / "hub" / "checkpoints") == [_name(url)]
    assert server.requests == ["/release/vssm_tiny.safetensors"]


def test_corrupt_safetensors_file_raises_value_error(tmp_path):
    pytest.importorskip("safetensors")
    _, state_dict = small_state_dict()
    path = tmp_path / "weights.safetensors"
    save_weights(state_dict, path)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match="could not be read") as excinfo:
        load_checkpoint_file(path)
    assert str(path) in str(excinfo.value) and excinfo.value.__cause__ is not None


def test_safetensors_without_the_package_names_pip(tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_checkpoint_file(path)
    with pytest.raises(ImportError, match="pip install safetensors"):
        save_weights({"w": torch.ones(1)}, tmp_path / "out.safetensors")
    save_weights({"w": torch.ones(1)}, tmp_path / "out.pth")   # torch.save needs nothing extra
    assert torch.equal(load_checkpoint_file(tmp_path / "out.pth")["w"], torch.ones(1))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_weights_round_trips(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    base = torch.arange(24.0).reshape(4, 6)
    state = {
        "weight": base,
        "tied": base,                       # the same tensor twice
        "rows": base[1:3],                  # a view into it
        "transposed": base.t(),             # not contiguous
        "bias": torch.nn.Parameter(torch.ones(3)),
        "ints": torch.tensor([1, 2, 3], dtype=torch.int64),
        "empty": torch.zeros(0),
    }
    path = tmp_path / f"weights{suffix}"
    save_weights(state, path)
    loaded = load_checkpoint_file(path)
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value.detach()) and loaded[key].dtype == value.dtype, key
    assert torch.equal(state["weight"], torch.arange(24.0).reshape(4, 6))   # input untouched


def test_save_weights_takes_a_model(tmp_path):
    pytest.importorskip("safetensors")
    model = _tiny_vssm()
    for name in ("m.safetensors", "m.pth"):
        save_weights(model, tmp_path / name)
        restored = vmamba.load_pretrained(vmamba.VSSM(depths=[1], dims=8, num_classes=3), tmp_path / name)
        assert_state_dicts_equal(restored.state_dict(), model.state_dict())


def test_save_weights_safetensors_refuses_non_tensors(tmp_path):
    pytest.importorskip("safetensors")
    with pytest.raises(TypeError, match="only tensors"):
        save_weights({"w": torch.ones(1), "epoch": 3}, tmp_path / "w.safetensors")
