"""The streaming CPU path (graph from placeholders, int8 weights streamed in) writes the same model
as litert-torch's own export of the real weights: same graph, same bytes in every tensor."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

from converter import cpu_gemma, cpu_stream
from converter.checkpoint import open_checkpoint
from converter.errors import ConversionError

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-gemma"
PREFILL, KV_CACHE = 8, 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """litert-torch's export of the real weights, and ours: template + streamed weights."""
    folder = tmp_path_factory.mktemp("cpu-stream")
    config = json.loads((FIXTURE / "config.json").read_text())
    source = open_checkpoint(FIXTURE, "safetensors")
    model, _ = cpu_gemma.build_model(config, source, placeholders=False)
    reference = cpu_gemma.export(model, config, folder / "reference", PREFILL, KV_CACHE)
    model, order = cpu_gemma.build_model(config, source, placeholders=True)
    template = cpu_gemma.export(model, config, folder / "template", PREFILL, KV_CACHE)
    matrices, _ = cpu_gemma.graph_names(config["num_hidden_layers"])
    streamed = folder / "streamed.tflite"
    cpu_stream.stream_weights(template, streamed, source, [matrices[n] for n in order], order)
    yield {"reference": reference, "template": template, "streamed": streamed, "source": source,
           "matrices": [matrices[n] for n in order], "order": order}
    source.close()


def load(path: Path) -> schema.ModelT:
    return schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)


def tensor_bytes(model: schema.ModelT, tensor: schema.TensorT) -> bytes:
    data = model.buffers[tensor.buffer].data
    return b"" if data is None else bytes(np.asarray(data, dtype=np.uint8))


def quantization(tensor: schema.TensorT) -> tuple:
    q = tensor.quantization
    if q is None:
        return ()
    return tuple(None if v is None else np.asarray(v).tolist() for v in (q.scale, q.zeroPoint, q.min, q.max)) + (
        q.quantizedDimension,)


def described(model: schema.ModelT, graph: schema.SubGraphT, index: int) -> tuple:
    """A tensor as an operator sees it: shape, type, quantization and bytes (tensor order may differ)."""
    if index < 0:
        return ()
    tensor = graph.tensors[index]
    return list(tensor.shape), tensor.type, quantization(tensor), tensor_bytes(model, tensor)


def test_streamed_model_equals_litert_torch_export(exported):
    ours, theirs = load(exported["streamed"]), load(exported["reference"])
    assert [s.signatureKey for s in ours.signatureDefs] == [s.signatureKey for s in theirs.signatureDefs]
    assert [o.builtinCode for o in ours.operatorCodes] == [o.builtinCode for o in theirs.operatorCodes]
    assert len(ours.subgraphs) == len(theirs.subgraphs)
    int8_matrices = set()
    for mine, reference in zip(ours.subgraphs, theirs.subgraphs):
        assert len(mine.tensors) == len(reference.tensors)
        assert len(mine.operators) == len(reference.operators)
        for a, b in zip(mine.operators, reference.operators):
            assert a.opcodeIndex == b.opcodeIndex
            for ours_list, theirs_list in ((a.inputs, b.inputs), (a.outputs, b.outputs)):
                assert [described(ours, mine, i) for i in ours_list] == \
                       [described(theirs, reference, i) for i in theirs_list]
            int8_matrices |= {tensor_bytes(ours, mine.tensors[i]) for i in a.inputs
                              if i >= 0 and mine.tensors[i].type == schema.TensorType.INT8}
    assert len(int8_matrices) == len(exported["order"])  # every streamed matrix was compared where it is used


def test_template_holds_no_weights(exported):
    """The template's matrices are the markers (all 127, one scale each), not the checkpoint's."""
    template = load(exported["template"])
    for tensor in template.subgraphs[0].tensors:
        if tensor.type == schema.TensorType.INT8 and len(tensor.shape) == 2:
            assert set(tensor_bytes(template, tensor)) == {127}
            assert cpu_stream.marker_index(float(tensor.quantization.scale[0])) >= 0


def test_a_matrix_missing_from_the_template_is_one_line(exported, tmp_path):
    out = tmp_path / "model.tflite"
    extra = exported["matrices"] + [("model.embed_tokens.weight",)]
    with pytest.raises(ConversionError, match=rf"no int8 tensor for matrices {len(extra) - 1} "):
        cpu_stream.stream_weights(exported["template"], out, exported["source"], extra, exported["order"] + ["x"])
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_tensor_of_another_shape_is_named(exported, tmp_path):
    out = tmp_path / "model.tflite"
    matrices = list(exported["matrices"])
    first = exported["order"].index("transformer_blocks.0.ff.w2.weight")
    matrices[first] = ("model.layers.0.mlp.up_proj.weight",)
    with pytest.raises(ConversionError, match=r"^transformer_blocks\.0\.ff\.w2\.weight: the graph holds a \[64, 256\] "
                                              r"matrix, the checkpoint gives \[256, 64\]$"):
        cpu_stream.stream_weights(exported["template"], out, exported["source"], matrices, exported["order"])
    assert list(tmp_path.iterdir()) == []
