"""ONNX export of zoo architectures with the torch backend; onnxruntime agrees with PyTorch."""
import io
import warnings

import pytest
import torch

import vmamba

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


@pytest.mark.parametrize("name", ["vmamba_tiny_s1l8", "vanilla_vmamba_tiny", "vmamba_tiny_s2l5"])
def test_export_matches_onnxruntime(name):
    torch.manual_seed(0)
    model = vmamba.create_model(name, depths=[1, 1, 2, 1]).eval()
    x = torch.randn(1, 3, 112, 80)  # stage maps 28x20 .. 4x3: chunked and partial chunks
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: the graph is fixed to this resolution
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=18,
                          input_names=["image"], output_names=["logits"])
    graph = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(graph)
    assert len(graph.graph.node) < 10000  # a per-position unroll of 28x20 maps alone would exceed it
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref = model(x)
    assert ((torch.from_numpy(got) - ref).abs().max() / ref.abs().max()) < 1e-4
