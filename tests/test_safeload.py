"""Checkpoint files are read without running their code; downloads are atomic and verified.

Everything runs on 127.0.0.1: no network access."""

import argparse
import builtins
import hashlib
import http.server
import io
import os
import pickle
import socket
import threading
import time
import zipfile
from collections import OrderedDict

import pytest
import torch

import vmamba
from vmamba import PickledGlobal, PickledObject, download_cached, load_checkpoint_file


# ---------------------------------------------------------------------------
# Helpers for checkpoint tests
# ---------------------------------------------------------------------------


class TrainConfig:
    """Stands in for a yacs CfgNode-like config object stored in checkpoints."""

    def __init__(self):
        self.model_name = "vssm_tiny"
        self.depths = [2, 2, 9, 2]


class DictConfig(dict):
    """A dict subclass with instance attributes, like yacs' CfgNode."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["frozen"] = True


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


# ---------------------------------------------------------------------------
# load_checkpoint_file: benign checkpoints
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_training_checkpoint_with_metadata_loads(tmp_path, zip_format):
    _, state_dict = small_state_dict()
    # Shaped like AdamW.state_dict() (torch.optim itself is slow to import).
    exp_avg = torch.randn(3, 4)
    optimizer_state = {
        "state": {0: {"step": torch.tensor(1.0), "exp_avg": exp_avg}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}],
    }
    checkpoint = {
        "model": state_dict,
        "config": TrainConfig(),
        "node": DictConfig(A=1, B=DictConfig(C=2)),
        "optimizer": optimizer_state,
        "epoch": 3,
        "args": argparse.Namespace(lr=0.1, batch_size=128),
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)

    loaded = load_checkpoint_file(path)

    assert_state_dicts_equal(loaded["model"], state_dict)
    assert loaded["epoch"] == 3
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], exp_avg)
    assert loaded["optimizer"]["param_groups"] == optimizer_state["param_groups"]
    assert isinstance(loaded["param"], torch.nn.Parameter)

    config = loaded["config"]
    assert isinstance(config, PickledObject)
    assert config.factory == PickledGlobal(TrainConfig.__module__, "TrainConfig")
    assert config.state == {"model_name": "vssm_tiny", "depths": [2, 2, 9, 2]}

    node = loaded["node"]
    assert node.global_name == f"{DictConfig.__module__}.DictConfig"
    assert node.dictitems["A"] == 1
    assert node.dictitems["B"].dictitems == {"C": 2}
    assert node.state == {"frozen": True}

    args = loaded["args"]
    assert args.factory == PickledGlobal("argparse", "Namespace")
    assert args.state == {"lr": 0.1, "batch_size": 128}


def test_numpy_metadata_becomes_placeholders(tmp_path):
    np = pytest.importorskip("numpy")
    _, state_dict = small_state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state_dict, "best_acc": np.float64(81.2)}, path)
    loaded = load_checkpoint_file(path)
    assert_state_dicts_equal(loaded["model"], state_dict)
    assert isinstance(loaded["best_acc"], PickledObject)
    assert loaded["best_acc"].factory.module.startswith("numpy")


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


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize(
    "payload_name", ["os.system", "exec", "eval", "open", "chained"]
)
def test_malicious_payload_is_not_executed(tmp_path, marker, payload_name, zip_format):
    _, state_dict = small_state_dict()
    payload = malicious_payloads(marker)[payload_name]
    path = tmp_path / "evil.pth"
    torch.save(
        {"model": state_dict, "evil": payload},
        path,
        _use_new_zipfile_serialization=zip_format,
    )

    loaded = load_checkpoint_file(path)

    assert_state_dicts_equal(loaded["model"], state_dict)
    assert isinstance(loaded["evil"], PickledObject)
    assert not marker.exists()


def test_malicious_payload_nested_in_dict_value(tmp_path, marker):
    _, state_dict = small_state_dict()
    payloads = malicious_payloads(marker)
    checkpoint = {
        "model": state_dict,
        "meta": {"history": [1, 2, {"hook": payloads["os.system"]}]},
        "extra": {"a": (payloads["exec"], payloads["eval"])},
    }
    path = tmp_path / "evil.pth"
    torch.save(checkpoint, path)

    loaded = load_checkpoint_file(path)

    assert_state_dicts_equal(loaded["model"], state_dict)
    hook = loaded["meta"]["history"][2]["hook"]
    assert hook.factory == PickledGlobal(os.system.__module__, "system")
    assert hook.args == (f"touch {marker}",)
    exec_obj, eval_obj = loaded["extra"]["a"]
    assert exec_obj.factory == PickledGlobal("builtins", "exec")
    assert eval_obj.factory == PickledGlobal("builtins", "eval")


def test_malicious_state_dict_value(tmp_path, marker):
    _, state_dict = small_state_dict()
    state_dict["evil"] = malicious_payloads(marker)["os.system"]
    path = tmp_path / "evil.pth"
    torch.save(state_dict, path)
    loaded = load_checkpoint_file(path)
    assert torch.equal(loaded["0.weight"], state_dict["0.weight"])
    assert isinstance(loaded["evil"], PickledObject)


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
    # REDUCE with a non-allowlisted, non-placeholder callable (a tensor).
    "call-tensor": b"\x80\x02ctorch\nTensor\n)R)R.",
    # copyreg extension registry lookup.
    "extension": b"\x80\x02\x82\x01.",
    # Persistent ids other than tensor storages.
    "persid-other": b"\x80\x02X\x05\x00\x00\x00otherK\x01\x86Q.",
    "persid-string": b"\x80\x02Pfoo\n.",
}


@pytest.mark.parametrize("name", sorted(_RAW_ATTACKS))
def test_restricted_unpickler_refuses_side_effects(name):
    with pytest.raises(pickle.UnpicklingError):
        vmamba._restricted_load(io.BytesIO(_RAW_ATTACKS[name]))
    assert not hasattr(torch.nn.Parameter, "safeload_pwned")
    assert not hasattr(torch.nn.Parameter, "a")


def test_restricted_unpickler_placeholder_operations():
    # GLOBAL os.system, REDUCE -> placeholder; calling it again (REDUCE on a
    # placeholder object) and BUILD on it are only recorded.
    data = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00id\x85R)R}X\x01\x00\x00\x00kK\x01sb."
    result = vmamba._restricted_load(io.BytesIO(data))
    assert isinstance(result, PickledObject)
    assert result.args == ()
    assert result.state == {"k": 1}
    assert result.factory.factory == PickledGlobal("os", "system")
    assert result.factory.args == ("id",)
    assert result.global_name == "os.system"


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_whole_module_pickle_becomes_placeholder(tmp_path, zip_format):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 3), path, _use_new_zipfile_serialization=zip_format)
    loaded = load_checkpoint_file(path)
    assert loaded.global_name == "torch.nn.modules.linear.Linear"
    assert loaded.state["_parameters"]["weight"].shape == (3, 2)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_sparse_tensors_are_validated_on_fallback(tmp_path, zip_format):
    indices = torch.tensor([[0, 2]])
    values = torch.tensor([1.0, 2.0])
    good = torch.sparse_coo_tensor(indices, values, (3,), check_invariants=True)
    path = tmp_path / "sparse.pth"
    torch.save({"s": good, "cfg": TrainConfig()}, path, _use_new_zipfile_serialization=zip_format)
    assert torch.equal(load_checkpoint_file(path)["s"].to_dense(), good.to_dense())

    # Out-of-bounds index: using it could read out of bounds, so loading fails.
    bad = torch.sparse_coo_tensor(indices * 50, values, (3,), check_invariants=False)
    torch.save({"s": bad, "cfg": TrainConfig()}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint_file(path)


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("scripted/data.pkl", pickle.dumps({}, protocol=2))
        archive.writestr("scripted/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(ValueError, match="TorchScript"):
        vmamba._check_format_for_restricted_load(str(path))
    with pytest.raises(ValueError, match="could not be read"):
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


def test_download_then_cache_hit(server, tmp_path):
    cache_dir = tmp_path / "cache"
    url = f"{server.base_url}/release/vssm_tiny.pth"

    path = download_cached(url, cache_dir=cache_dir, progress=True)

    assert path == os.path.join(cache_dir, "vssm_tiny.pth")
    with open(path, "rb") as file:
        assert file.read() == server.body
    assert server.requests == ["/release/vssm_tiny.pth"]
    assert _files(cache_dir) == ["vssm_tiny.pth"]
    assert_state_dicts_equal(load_checkpoint_file(path), server.state_dict)

    assert download_cached(url, cache_dir=str(cache_dir), progress=False) == path
    assert len(server.requests) == 1


def test_default_cache_dir_is_torch_hub(server, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path = download_cached(f"{server.base_url}/w.pth", progress=False)
    assert path == str(tmp_path / "hub" / "checkpoints" / "w.pth")
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
    (tmp_path / "model.pth").write_bytes(b"stale or corrupted")
    digest = hashlib.sha256(server.body).hexdigest()
    with pytest.warns(UserWarning, match="downloading .* again"):
        path = download_cached(url, sha256=digest, progress=False, cache_dir=tmp_path)
    with open(path, "rb") as file:
        assert file.read() == server.body
    assert len(server.requests) == 1


def test_cached_and_fresh_file_both_mismatch(server, tmp_path):
    url = f"{server.base_url}/model.pth"
    (tmp_path / "model.pth").write_bytes(b"stale")
    with pytest.warns(UserWarning):
        with pytest.raises(ValueError, match="SHA-256 mismatch"):
            download_cached(url, sha256="deadbeef", progress=False, cache_dir=tmp_path)
    assert _files(tmp_path) == []
    assert len(server.requests) == 1


@pytest.mark.parametrize("mode", ["404", "500"])
def test_http_error_names_url_and_cache_path(server, tmp_path, mode):
    server.mode = mode
    url = f"{server.base_url}/missing.pth"
    with pytest.raises(RuntimeError) as excinfo:
        download_cached(url, progress=False, cache_dir=tmp_path)
    message = str(excinfo.value)
    assert url in message
    assert os.path.join(tmp_path, "missing.pth") in message
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
    assert url in str(excinfo.value)
    assert os.path.join(tmp_path, "model.pth") in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, OSError)
    assert _files(tmp_path) == []


def test_timeout(server, tmp_path, monkeypatch):
    monkeypatch.setattr(vmamba, "_DOWNLOAD_TIMEOUT_S", 0.3)
    server.mode = "slow"
    url = f"{server.base_url}/model.pth"
    with pytest.raises(RuntimeError, match="timed out") as excinfo:
        download_cached(url, progress=False, cache_dir=tmp_path)
    assert url in str(excinfo.value)
    assert _files(tmp_path) == []


def test_truncated_body_leaves_no_file_then_recovers(server, tmp_path):
    url = f"{server.base_url}/model.pth"
    server.mode = "truncate"
    with pytest.raises(RuntimeError, match="connection closed after") as excinfo:
        download_cached(url, progress=False, cache_dir=tmp_path)
    assert url in str(excinfo.value)
    assert _files(tmp_path) == []  # neither final file nor .partial leftovers

    server.mode = "ok"
    path = download_cached(url, progress=False, cache_dir=tmp_path)
    with open(path, "rb") as file:
        assert file.read() == server.body
    assert _files(tmp_path) == ["model.pth"]


@pytest.mark.parametrize(
    "url_path, expected",
    [
        ("/a/b/model.pth", "model.pth"),
        ("/a/vssm%20tiny%231.pth", "vssm_tiny_1.pth"),
        ("/a/evil%2F..%2Fpasswd", "evil_.._passwd"),
        ("/a/%2e%2e%2fetc", "_etc"),
        ("/a/%00nul.pth", "_nul.pth"),
        ("/a/m%C3%B6del.pth", "m_del.pth"),
    ],
)
def test_cache_file_name_is_filesystem_safe(url_path, expected):
    assert vmamba._cache_file_name(f"https://example.com{url_path}?x=1#frag") == expected


def test_cache_file_name_is_length_limited():
    name = vmamba._cache_file_name("https://example.com/" + "a" * 500 + ".pth")
    assert len(name) <= 200 and name.endswith(".pth")


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
