"""Loading and downloading weights as a hostile server, file or user would try them.

Each test asserts the promise, not only that something raised: a failed load leaves the model's
whole state dict as it was; the cache never holds an incomplete or wrong file; a failed command
leaves its input and any existing output intact. Servers run on 127.0.0.1 inside the test."""

import http.server
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import zipfile

import pytest
import torch

import vmamba

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return vmamba.VSSM(depths=[1, 1, 1, 1], dims=16, num_classes=10)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} was overwritten"


def assert_refused_unchanged(model, source, *fragments, **kwargs):
    """load_pretrained(model, source) raises ValueError naming ``fragments``; the model is exactly as before."""
    before = snapshot(model)
    with pytest.raises(ValueError) as excinfo:
        vmamba.load_pretrained(model, source, **kwargs)
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message
    assert_unchanged(model, before)
    return message


# ---------------------------------------------------------------------------
# A scriptable HTTP server: server.routes[path] = function(handler) writes the answer.
# ---------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.server.requests.append(self.path)
        route = self.server.routes.get(self.path.split("?")[0])
        if route is None:
            self.send_error(404)
        else:
            route(self)

    def log_message(self, *args):
        pass


def send(body, content_type="application/octet-stream", length=None, cut=None, pause=None):
    """An answer: ``body`` announced as ``length`` bytes (default: its size); only ``cut`` bytes are sent, after
    which the handler waits for ``pause`` (an Event or seconds) and hangs up."""
    def route(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        handler.wfile.write(body[:cut])
        handler.wfile.flush()
        if isinstance(pause, threading.Event):
            pause.wait(10)
        elif pause:
            time.sleep(pause)
        handler.close_connection = True
    return route


def redirect(location):
    def route(handler):
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return route


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.routes, httpd.requests = {}, []
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """torch.hub's cache folder (<hub>/checkpoints), private to the test."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def checkpoint_bytes(model):
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "epoch": 1}, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------


def test_urls_differing_in_query_or_host_never_share_a_cache_file(server, cache):
    one, two, three = tiny_model(1), tiny_model(2), tiny_model(3)
    answers = {"/weights.pth?id=1": checkpoint_bytes(one), "/weights.pth?id=2": checkpoint_bytes(two)}
    server.routes["/weights.pth"] = lambda handler: send(answers.get(handler.path, checkpoint_bytes(three)))(handler)
    port = server.server_address[1]
    for url, source in ((f"{server.base}/weights.pth?id=1", one), (f"{server.base}/weights.pth?id=2", two),
                        (f"http://localhost:{port}/weights.pth", three)):
        model = vmamba.load_pretrained(tiny_model(), url, progress=False)
        assert_unchanged(model, source.state_dict())   # its own weights, not the previous URL's
    names = files(cache)
    assert len(names) == 3 and all(n.startswith("weights-") and n.endswith(".pth") for n in names)
    # Cached: loading again asks the server nothing.
    vmamba.load_pretrained(tiny_model(), f"{server.base}/weights.pth?id=1", progress=False)
    assert len(server.requests) == 3


def test_same_file_name_under_two_folders_gets_two_cache_files(server, cache):
    a, b = tiny_model(1), tiny_model(2)
    server.routes["/a/w.pth"], server.routes["/b/w.pth"] = send(checkpoint_bytes(a)), send(checkpoint_bytes(b))
    assert_unchanged(vmamba.load_pretrained(tiny_model(), f"{server.base}/a/w.pth", progress=False), a.state_dict())
    assert_unchanged(vmamba.load_pretrained(tiny_model(), f"{server.base}/b/w.pth", progress=False), b.state_dict())
    assert len(files(cache)) == 2


def test_release_urls_keep_torch_hub_file_names():
    """torch.hub and timm cache a URL under os.path.basename(urlparse(url).path): the same file as ours."""
    for name in vmamba.list_models():
        url = vmamba.pretrained_url(name)
        assert vmamba._cache_file_name(url) == os.path.basename(urllib.parse.urlparse(url).path)
    assert vmamba._cache_file_name(vmamba.pretrained_url("vmamba_tiny_s1l8")) == "vssm1_tiny_0230s_ckpt_epoch_264.pth"
    other = vmamba.pretrained_url("vmamba_tiny_s1l8") + "?mirror=1"   # not the release file itself
    assert vmamba._cache_file_name(other) != "vssm1_tiny_0230s_ckpt_epoch_264.pth"


@pytest.mark.parametrize("cut, legacy", [(0.5, False), (0.999, False), (0.9, True)],
                         ids=["half", "all-but-a-byte", "legacy-format"])
def test_cut_off_download_is_never_cached(server, cache, cut, legacy):
    body = checkpoint_bytes(tiny_model(1))
    if legacy:   # no zip directory at the end to miss: only the announced size tells
        buffer = io.BytesIO()
        torch.save(tiny_model(1).state_dict(), buffer, _use_new_zipfile_serialization=False)
        body = buffer.getvalue()
    server.routes["/w.pth"] = send(body, cut=int(len(body) * cut))
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="connection closed early"):
        vmamba.load_pretrained(model, f"{server.base}/w.pth", progress=False)
    assert_unchanged(model, before)
    assert files(cache) == []   # neither the file nor a temporary one


def test_body_without_content_length_cut_inside_the_zip_is_refused(server, cache):
    body = checkpoint_bytes(tiny_model(1))

    def no_length(handler):   # HTTP/1.0 style: the body ends when the connection does
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        handler.wfile.write(body[: len(body) // 2])
        handler.close_connection = True
    server.routes["/w.pth"] = no_length
    with pytest.raises(RuntimeError, match="zip archive that does not open"):
        vmamba.download_cached(f"{server.base}/w.pth", progress=False)
    assert files(cache) == []


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_html_page_with_status_200_is_refused(server, cache, content_type):
    page = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please log in</body></html>\n"
    server.routes["/w.pth"] = send(page, content_type=content_type)
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(RuntimeError) as excinfo:
        vmamba.load_pretrained(model, f"{server.base}/w.pth", progress=False)
    message = str(excinfo.value)
    assert "the server returned an HTML page, not a checkpoint" in message
    assert "weights_only=False" not in message and "will likely succeed" not in message
    assert_unchanged(model, before)
    assert files(cache) == []


def test_server_stalling_after_headers_times_out(server, cache):
    body = checkpoint_bytes(tiny_model(1))
    release = threading.Event()
    server.routes["/w.pth"] = send(body, cut=100, pause=release)
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="timed out") as excinfo:
            vmamba.download_cached(f"{server.base}/w.pth", progress=False, timeout=0.5)
    finally:
        release.set()
    assert time.monotonic() - start < 5
    assert isinstance(excinfo.value.__cause__, (TimeoutError, socket.timeout))
    assert files(cache) == []   # no .partial left behind


def test_server_that_accepts_but_never_answers_times_out(tmp_path):
    with socket.socket() as listener:   # accepts connections (backlog) but never reads or answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/w.pth"
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="timed out"):
            vmamba.download_cached(url, progress=False, cache_dir=tmp_path, timeout=0.5)
        assert time.monotonic() - start < 5
    assert files(tmp_path) == []


def test_redirects_are_followed_and_cached_under_the_asked_url(server, cache):
    source = tiny_model(1)
    server.routes["/release/w.pth"] = redirect("/objects/abc123")
    server.routes["/objects/abc123"] = send(checkpoint_bytes(source))
    url = f"{server.base}/release/w.pth"
    model = vmamba.load_pretrained(tiny_model(), url, progress=False)
    assert_unchanged(model, source.state_dict())
    assert files(cache) == [vmamba._cache_file_name(url)]
    assert server.requests == ["/release/w.pth", "/objects/abc123"]


def test_redirect_to_an_error_page_is_refused(server, cache):
    server.routes["/w.pth"] = redirect("/login")
    server.routes["/login"] = send(b"<html><body>login</body></html>", content_type="text/html")
    with pytest.raises(RuntimeError, match="HTML page, not a checkpoint"):
        vmamba.download_cached(f"{server.base}/w.pth", progress=False)
    assert files(cache) == []


def test_cut_off_file_left_in_the_cache_by_another_tool_is_downloaded_again(server, cache, monkeypatch):
    """torch.hub and timm share the release files' cache names and do not check completeness: we do."""
    monkeypatch.setattr(vmamba, "_RELEASES", server.base + "/")
    body = checkpoint_bytes(tiny_model(1))
    server.routes["/v2/vssm.pth"] = send(body)
    cache.mkdir(parents=True)
    (cache / "vssm.pth").write_bytes(body[: len(body) // 2])   # the name torch.hub would use
    with pytest.warns(UserWarning, match="zip archive that does not open.*downloading .* again"):
        path = vmamba.download_cached(f"{server.base}/v2/vssm.pth", progress=False)
    assert path == str(cache / "vssm.pth") and (cache / "vssm.pth").read_bytes() == body
    assert files(cache) == ["vssm.pth"]


def test_failing_download_racing_a_good_one_keeps_the_good_file(server, cache):
    body = checkpoint_bytes(tiny_model(1))
    release = threading.Event()
    answers = [send(body, cut=len(body) // 3, pause=release), send(body)]   # first request cut, second whole
    server.routes["/w.pth"] = lambda handler: answers.pop(0)(handler)
    url = f"{server.base}/w.pth"
    failed = []

    def slow_failing_download():
        try:
            vmamba.download_cached(url, progress=False)
        except RuntimeError as err:
            failed.append(err)
    thread = threading.Thread(target=slow_failing_download)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    path = vmamba.download_cached(url, progress=False)   # the good one, done while the first is still running
    release.set()   # now the first one's connection closes early
    thread.join(10)
    assert failed and "closed early" in str(failed[0])
    with open(path, "rb") as file:
        assert file.read() == body
    assert files(cache) == [os.path.basename(path)]


def test_failed_download_says_what_to_do_offline(tmp_path, monkeypatch):
    """vmamba_tiny_s1l8(pretrained=True) without network: the file name, the folder, and the local-path way."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(vmamba, "_RELEASES", f"http://127.0.0.1:{port}/")
    with pytest.raises(RuntimeError) as excinfo:
        vmamba.vmamba_tiny_s1l8(pretrained=True, depths=[1, 1, 1, 1])
    message = str(excinfo.value)
    folder = str(tmp_path / "hub" / "checkpoints")
    assert f"save the file as vssm1_tiny_0230s_ckpt_epoch_264.pth in {folder}" in message
    assert "pass a local path to load_pretrained or pretrained=" in message
    assert f"http://127.0.0.1:{port}/%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth" in message


# ---------------------------------------------------------------------------
# timm's pretrained=True (issue: an offline failure named no URL)
# ---------------------------------------------------------------------------


@pytest.fixture
def timm_mod():
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm)")
    vmamba.register_timm()
    return timm


TINY = dict(depths=[1, 1, 1, 1], dims=16)


def test_timm_pretrained_offline_names_url_and_cache_file(timm_mod, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth"
    monkeypatch.setitem(vmamba.default_cfgs["vmamba_tiny_s1l8"], "url", url)
    with pytest.raises(RuntimeError) as excinfo:
        timm_mod.create_model("vmamba_tiny_s1l8", pretrained=True, **TINY)
    message = str(excinfo.value)
    assert url in message and str(tmp_path / "hub" / "checkpoints") in message
    assert vmamba._cache_file_name(url) in message and "pass a local path" in message
    assert isinstance(excinfo.value.__cause__, OSError)
    # The advice works: a local file, as timm takes it, loads without the network.
    source = timm_mod.create_model("vmamba_tiny_s1l8", **TINY)
    path = tmp_path / "local.pth"
    torch.save({"model": source.state_dict()}, path)
    model = timm_mod.create_model("vmamba_tiny_s1l8", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                  **TINY)
    assert_unchanged(model, source.state_dict())


def test_timm_pretrained_downloads_through_the_checked_path(timm_mod, server, cache, monkeypatch):
    source = timm_mod.create_model("vmamba_tiny_s1l8", **TINY)
    page = b"<!doctype html><html>rate limited</html>"
    server.routes["/bad.pth"] = send(page, content_type="text/html")
    server.routes["/good.pth"] = send(checkpoint_bytes(source))
    with pytest.raises(RuntimeError, match="HTML page, not a checkpoint"):
        timm_mod.create_model("vmamba_tiny_s1l8", pretrained=True,
                              pretrained_cfg_overlay=dict(url=f"{server.base}/bad.pth"), **TINY)
    assert files(cache) == []
    model = timm_mod.create_model("vmamba_tiny_s1l8", pretrained=True,
                                  pretrained_cfg_overlay=dict(url=f"{server.base}/good.pth"), **TINY)
    assert_unchanged(model, source.state_dict())


# ---------------------------------------------------------------------------
# State dicts that must not load: checked before the first parameter is written
# ---------------------------------------------------------------------------


def _replace_late_key(transform):
    """The model's own state dict with the 44th of its 96 tensors replaced by transform(tensor)."""
    state = dict(tiny_model(1).state_dict())
    key = list(state)[43]
    state[key] = transform(state[key])
    return state, key


@pytest.mark.parametrize("kind, transform, problem", [
    ("sparse", lambda t: t.to_sparse(), "torch.sparse_coo tensor, not a dense one"),
    ("meta", lambda t: t.to("meta"), "on the meta device"),
    ("quantized", lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8), "quantized"),
    ("integer", lambda t: t.long(), "torch.int64 tensor, not floating point"),
    ("boolean", lambda t: t > 0, "torch.bool tensor, not floating point"),
])
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions")
def test_unusable_tensor_is_refused_before_anything_is_written(kind, transform, problem, strict):
    state, key = _replace_late_key(transform)
    message = assert_refused_unchanged(tiny_model(), state, key, problem, "The model is unchanged.", strict=strict)
    assert message.startswith("cannot load the given state dict into VSSM")


@pytest.mark.parametrize("name", ["x_proj_weight", "dt_projs_weight"])
def test_transposed_projection_is_not_reshaped(name):
    state = dict(tiny_model(1).state_dict())
    key = f"layers.0.blocks.0.op.{name}"
    state[key] = state[key].transpose(1, 2).contiguous()   # same element count, wrong layout
    assert_refused_unchanged(tiny_model(), state, key, "mis-shaped", "The model is unchanged.")
    # Non-strict: everything else loads, the transposed tensor does not.
    model = tiny_model()
    before = snapshot(model)
    with pytest.warns(UserWarning, match="partial load"):
        vmamba.load_pretrained(model, state, strict=False)
    assert torch.equal(model.state_dict()[key], before[key])
    assert torch.equal(model.state_dict()["patch_embed.0.weight"], state["patch_embed.0.weight"])


def test_the_newer_layouts_flattened_projections_still_load():
    source = tiny_model(1)
    state = {}
    for key, value in source.state_dict().items():
        for stacked, flat in (("x_proj_weight", "x_proj.weight"), ("dt_projs_weight", "dt_projs.weight"),
                              ("dt_projs_bias", "dt_projs.bias")):
            if key.endswith(stacked):
                key, value = key.replace(stacked, flat), value.flatten(0, 1)
        state[key] = value
    assert_unchanged(vmamba.load_pretrained(tiny_model(), state), source.state_dict())


def test_bias_of_another_layout_with_the_same_size_is_refused():
    state = dict(tiny_model(1).state_dict())
    key = "layers.0.blocks.0.op.dt_projs_bias"
    state[key] = state[key].reshape(8, -1)   # (8, 8) for (4, 16): same count, not the released (64,) layout
    assert_refused_unchanged(tiny_model(), state, key, "mis-shaped")


@pytest.mark.parametrize("second", ["module.", "backbone.module.", "february"])
def test_two_weight_sets_for_the_same_keys_are_refused(second):
    first, other = tiny_model(1).state_dict(), tiny_model(2).state_dict()
    if second == "february":
        mixed = dict(first, **{"norm.weight": other["classifier.norm.weight"]})
        keys = ("'classifier.norm.weight'", "'norm.weight'")
    else:
        mixed = dict(first, **{second + k: v for k, v in other.items()})
        keys = ("'patch_embed.0.weight'", f"'{second}patch_embed.0.weight'")
        if second.startswith("backbone."):   # a backbone prefix keeps only the backbone.* keys: no clash
            assert_unchanged(vmamba.load_pretrained(tiny_model(), mixed), other)
            return
    assert_refused_unchanged(tiny_model(), mixed, "two weight sets", *keys)


@pytest.mark.parametrize("bad_key", [3, 2.5, ("a", "b"), b"patch_embed.0.weight", None])
def test_non_string_keys_are_refused_by_name(bad_key):
    state = dict(tiny_model(1).state_dict())
    state[bad_key] = torch.zeros(1)
    assert_refused_unchanged(tiny_model(), state, repr(bad_key), type(bad_key).__name__, "keys are strings")


def test_dict_without_tensors_and_odd_keys_gets_a_message_not_a_crash():
    message = assert_refused_unchanged(tiny_model(), {1: "a", "epoch": 3, (2,): None}, "no state dict found")
    assert "'epoch'" in message and "1" in message


def test_payload_checkpoint_leaves_model_unchanged(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_model(1).state_dict(), "hook": Payload()}, path)
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"system.*If you trust the file"):
        vmamba.load_pretrained(model, path)
    assert_unchanged(model, before)
    assert not marker.exists()


def test_html_file_on_disk_gets_a_plain_answer(tmp_path):
    path = tmp_path / "vssm.pth"
    path.write_text("<!DOCTYPE html><html><body>404</body></html>")
    message = assert_refused_unchanged(tiny_model(), path, str(path), "an HTML page, not a checkpoint")
    assert "weights_only=False" not in message


# ---------------------------------------------------------------------------
# Crafted files: a zip bomb behind a refused global, lying safetensors headers
# ---------------------------------------------------------------------------


_RSS_PROBE = textwrap.dedent("""
    import resource, sys
    import vmamba
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        vmamba.load_checkpoint_file(sys.argv[1])
        outcome = "loaded"
    except ValueError as err:
        outcome = "refused: " + str(err)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)   # KiB on Linux
    print(outcome)
""")


def _bomb(path, pickle_global, unused_mib):
    """A torch.save zip with an extra member of ``unused_mib`` MiB of zeros, deflated (~1/1000 of that on disk)."""
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.ones(4)}, "x": pickle_global}, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            archive.writestr(info, source.read(info))
        zeros = bytes(1 << 20)
        info = zipfile.ZipInfo("archive/unused_bomb")
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as member:
            for _ in range(unused_mib):
                member.write(zeros)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")
@pytest.mark.parametrize("global_kind", ["refused", "allowed"])
def test_unused_compressed_member_is_never_inflated(tmp_path, global_kind):
    import argparse
    path = tmp_path / "bomb.pth"
    _bomb(path, os.system if global_kind == "refused" else argparse.Namespace(a=1), unused_mib=512)
    assert path.stat().st_size < 8 << 20
    result = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    grown_kib, outcome = result.stdout.strip().split("\n", 1)
    assert int(grown_kib) < 64 * 1024, f"peak RSS grew by {int(grown_kib) >> 10} MiB"
    if global_kind == "refused":
        assert outcome.startswith("refused:") and "system" in outcome and "If you trust the file" in outcome
    else:
        assert outcome == "loaded"


def _safetensors_file(path, header, data):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def _lying_headers():
    good = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    return {
        "offsets-past-the-end": ({"w": dict(good["w"], data_offsets=[0, 4096])}, bytes(16)),
        "shape-larger-than-data": ({"w": dict(good["w"], shape=[64, 64])}, bytes(16)),
        "overlapping": ({"a": dict(good["w"]), "b": dict(good["w"], data_offsets=[8, 24])}, bytes(24)),
        "header-not-an-object": ([1, 2, 3], b""),
        "trailing-garbage": (good, bytes(16) + b"<html>"),
    }


@pytest.mark.parametrize("case", sorted(_lying_headers()))
def test_lying_safetensors_header_is_refused(tmp_path, case):
    pytest.importorskip("safetensors")
    header, data = _lying_headers()[case]
    path = _safetensors_file(tmp_path / "w.safetensors", header, data)
    assert_refused_unchanged(tiny_model(), path, str(path), "could not be read")


def test_safetensors_header_length_past_the_end_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b'{"w": {}}')
    assert_refused_unchanged(tiny_model(), path, str(path), "could not be read")


def test_safetensors_with_integer_weights_is_refused(tmp_path):
    pytest.importorskip("safetensors")
    state, key = _replace_late_key(lambda t: t.to(torch.int32))
    path = tmp_path / "w.safetensors"
    vmamba.save_weights(state, path)
    assert_refused_unchanged(tiny_model(), path, key, "not floating point")


# ---------------------------------------------------------------------------
# The command line: nothing it writes is ever half there; user errors are one line and exit 2
# ---------------------------------------------------------------------------


@pytest.fixture
def release_like(tmp_path):
    """A checkpoint in the released layout of vmamba_tiny_s1l8 with one block per stage (--model finds it)."""
    torch.manual_seed(0)
    source = vmamba.vmamba_tiny_s1l8(depths=[1, 1, 1, 1])
    path = tmp_path / "in.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    return path


def run_convert(capsys, *argv):
    code = vmamba.main(["convert", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.err


def test_convert_refuses_to_write_over_its_input(release_like, capsys, tmp_path):
    original = release_like.read_bytes()
    for output in (release_like, tmp_path / "." / "in.pth"):
        for force in ((), ("--force",)):
            code, err = run_convert(capsys, release_like, output, *force)
            assert code == 2 and err.count("\n") == 1 and "is the input checkpoint" in err
    assert release_like.read_bytes() == original


def test_convert_refuses_an_existing_output_without_force(release_like, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(vmamba, "create_model", lambda name, **kw: vmamba.vmamba_tiny_s1l8(depths=[1, 1, 1, 1]))
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    code, err = run_convert(capsys, release_like, out, "--model", "vmamba_tiny_s1l8")
    assert code == 2 and "exists; pass --force" in err and err.count("\n") == 1
    assert out.read_bytes() == b"precious"
    if vmamba.importlib.util.find_spec("safetensors") is None:
        return
    assert run_convert(capsys, release_like, out, "--model", "vmamba_tiny_s1l8", "--force")[0] == 0
    assert vmamba.load_checkpoint_file(out).keys() == vmamba.vmamba_tiny_s1l8(depths=[1, 1, 1, 1]).state_dict().keys()
    assert files(tmp_path) == ["in.pth", "out.safetensors"]


def test_convert_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    cases = [
        ([tmp_path / "missing.pth", tmp_path / "o.pth"], "missing.pth"),
        ([tmp_path / "notes.txt", tmp_path / "o.pth"], "not a checkpoint"),
        ([tmp_path / "notes.txt", tmp_path / "no" / "such" / "folder" / "o.pth"], "not a checkpoint"),
    ]
    (tmp_path / "notes.txt").write_text("hello")
    for argv, fragment in cases:
        code, err = run_convert(capsys, *argv)
        assert code == 2 and err.startswith("vmamba.py convert: error:") and fragment in err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert files(tmp_path) == ["notes.txt"]
    with pytest.raises(SystemExit) as excinfo:   # argparse's own errors: exit 2 as well
        vmamba.main(["convert", str(tmp_path / "notes.txt")])
    assert excinfo.value.code == 2


def test_write_failing_midway_leaves_no_partial_output(release_like, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(vmamba, "create_model", lambda name, **kw: vmamba.vmamba_tiny_s1l8(depths=[1, 1, 1, 1]))
    original = release_like.read_bytes()
    out = tmp_path / "out.pth"
    out.write_bytes(b"old output")

    def failing_save(obj, path, *args, **kwargs):   # writes half a file, then the disk is full
        with open(path, "wb") as file:
            file.write(original[: len(original) // 2])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", failing_save)
    code, err = run_convert(capsys, release_like, out, "--model", "vmamba_tiny_s1l8", "--force")
    assert code == 2 and "No space left on device" in err
    assert out.read_bytes() == b"old output" and release_like.read_bytes() == original
    assert files(tmp_path) == ["in.pth", "out.pth"]   # the temporary file is gone too


_KILLED_WRITER = textwrap.dedent("""
    import os, sys, time, torch
    import vmamba
    marker = sys.argv[3]
    vmamba.create_model = lambda name, **kw: vmamba.vmamba_tiny_s1l8(depths=[1, 1, 1, 1])
    def stalled_save(obj, path, *args, **kwargs):   # half written when the process is killed
        with open(path, "wb") as file:
            file.write(b"PK\\x03\\x04" + bytes(1 << 16))
            file.flush()
            open(marker, "w").close()
            time.sleep(60)
    torch.save = stalled_save
    vmamba.main(["convert", sys.argv[1], sys.argv[2], "--model", "vmamba_tiny_s1l8", "--force"])
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("existing", [True, False], ids=["over-an-old-output", "new-output"])
def test_convert_killed_mid_write_leaves_input_and_output_intact(release_like, tmp_path, existing):
    original = release_like.read_bytes()
    out, marker = tmp_path / "out.pth", tmp_path / "writing"
    if existing:
        out.write_bytes(b"old output")
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(release_like), str(out), str(marker)],
                             cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    assert release_like.read_bytes() == original
    if existing:
        assert out.read_bytes() == b"old output"
    else:
        assert not out.exists()
    leftovers = [n for n in files(tmp_path) if n not in ("in.pth", "out.pth", "writing")]
    assert all(n.startswith(".out.pth.") and n.endswith(".partial") for n in leftovers)   # hidden, never the output


def test_save_weights_replaces_the_target_only_when_complete(tmp_path, monkeypatch):
    target = tmp_path / "w.pth"
    vmamba.save_weights({"w": torch.ones(2)}, target)
    monkeypatch.setattr(torch, "save", lambda obj, path: (open(path, "wb").write(b"PK"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        vmamba.save_weights({"w": torch.zeros(2)}, target)
    monkeypatch.undo()
    assert torch.equal(vmamba.load_checkpoint_file(target)["w"], torch.ones(2))
    assert files(tmp_path) == ["w.pth"]
