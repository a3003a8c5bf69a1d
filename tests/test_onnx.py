"""ONNX export of zoo architectures with the torch backend; onnxruntime agrees with PyTorch."""
import io
import warnings

import pytest
import torch

import vmamba

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


def _run(model_bytes, feeds):
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {name: value.numpy() for name, value in feeds.items()})


def _rel(got, ref):
    return ((torch.from_numpy(got) - ref).abs().max() / ref.abs().max()).item()


def _legacy_export(module, args, names):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: the graph is fixed to these shapes
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=18, input_names=names)
    return buffer.getvalue()


@pytest.mark.parametrize("length", [16, 33, 140])
def test_scan_export_matches_onnxruntime(length):
    """One chunk, and lengths that are no multiple of 16 (33, 140): the exported graph must
    chunk them as eager does. (The legacy exporter once turned -(-L // T) into 2 for L=33.)"""

    class Scan(torch.nn.Module):
        def forward(self, u, delta, A, B, C):
            return vmamba.selective_scan(u, delta, A, B, C, delta_softplus=True, backend="torch")

    args = (torch.randn(1, 12, length), torch.randn(1, 12, length), -torch.rand(12, 4),
            torch.randn(1, 4, 4, length), torch.randn(1, 4, 4, length))
    (got,) = _run(_legacy_export(Scan(), args, list("udABC")), dict(zip("udABC", args)))
    assert _rel(got, Scan()(*args)) < 1e-5


@pytest.mark.parametrize("name", ["vmamba_tiny_s1l8", "vanilla_vmamba_tiny", "vmamba_tiny_s2l5"])
def test_export_matches_onnxruntime(name):
    torch.manual_seed(0)
    model = vmamba.create_model(name, depths=[1, 1, 2, 1]).eval()
    x = torch.randn(1, 3, 112, 80)  # stage maps 28x20 .. 4x3: one chunk and several
    model_bytes = _legacy_export(model, (x,), ["image"])
    graph = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(graph)
    assert len(graph.graph.node) < 10000  # a per-position unroll of 28x20 maps alone would exceed it
    (got,) = _run(model_bytes, {"image": x})
    with torch.no_grad():
        ref = model(x)
    assert _rel(got, ref) < 1e-4


def test_dynamo_export_matches_onnxruntime():
    """torch.onnx.export(dynamo=True), through torch.export, with a dynamic batch: one ONNX model
    for every batch size. Two stages keep it to seconds."""
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (the dynamo exporter needs it)")
    torch.manual_seed(0)
    model = vmamba.create_model("vmamba_tiny_s1l8", depths=[1, 1], dims=8).eval()
    x = torch.randn(2, 3, 80, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    onnx.checker.check_model(program.model_proto)
    assert len(program.model_proto.graph.node) < 2000
    model_bytes = program.model_proto.SerializeToString()
    for inputs in (x, torch.randn(1, 3, 80, 48), torch.randn(5, 3, 80, 48)):
        (got,) = _run(model_bytes, {"image": inputs})
        with torch.no_grad():
            ref = model(inputs)
        assert got.shape == ref.shape and _rel(got, ref) < 1e-5
