"""int8 `--backend cpu` streams the weights into a graph template built from shared placeholders
(converter/cpu/stream.py): the model computes exactly what litert-torch's own export of the real
weights computes (both signatures, logits and KV cache bitwise, ai_edge_litert's interpreter), for
tiny models of every family with a CPU graph, with and without LoRA inputs; and the template cache
(converter/cpu/cache.py) hits, misses, and never trusts a damaged, foreign or hostile entry."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from . import test_cpu_backend as backend
from . import test_cpu_families as families

pytest.importorskip("litert_torch")

PREFILL, KV_CACHE = 4, 16
# (model type, adapter or not): every family streamed (Gemma 2 is exported whole, see below); LoRA
# inputs both on classes that take them (Gemma 1, Phi-2, Llama) and on a wrapped one (Gemma 3).
CASES = [("GEMMA_2B", True), ("GEMMA3_1B", True), ("PHI_2", True), ("LLAMA3_2_1B", True), ("QWEN2_5_0_5B", False)]
KINDS = {model_type: kind for kind, (model_type, _) in families.FAMILIES.items()}


def tiny(model_type: str):
    return families.tiny_model(KINDS[model_type]) if model_type in KINDS else backend.hf_model(model_type)


def make_plan(folder: Path, model_type: str, lora: bool, **options):
    (folder / "out").mkdir(exist_ok=True)  # litert-torch's scratch files go beside the output
    return families.cpu_plan(folder / "base", model_type, folder / "out", kv_cache_size=KV_CACHE,
                             prefill_length=PREFILL, lora_ckpt=folder / "lora" if lora else None, **options)


def write(plan, path: Path, streamed: bool) -> Path:
    from converter.cpu import convert, graph, lora

    model_config = graph.model_config(plan, KV_CACHE)
    lora_inputs = lora.lora_tensors(plan) if plan.lora is not None else None
    with path.open("wb") as handle:
        (convert.write_streamed if streamed else convert.write_whole)(plan, model_config, handle, lora_inputs)
    return path


def outputs(path: Path) -> dict:
    """Every output of every signature on the same random inputs (tokens, positions, mask, cache, LoRA)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    rng = np.random.default_rng(0)
    results = {}
    for name in sorted(interpreter.get_signature_list()):
        runner = interpreter.get_signature_runner(name)
        inputs = {}
        for key, detail in sorted(runner.get_input_details().items()):
            shape = detail["shape"]
            if key == "input_pos":
                inputs[key] = np.arange(shape[0], dtype=np.int32) + 3
            elif detail["dtype"] == np.int32:
                inputs[key] = rng.integers(0, 512, shape).astype(np.int32)
            else:
                inputs[key] = rng.standard_normal(shape).astype(detail["dtype"])
        results[name] = runner(**inputs)
    return results


@pytest.fixture(scope="module", params=CASES, ids=[f"{t}-{'lora' if lora else 'base'}" for t, lora in CASES])
def case(request, tmp_path_factory):
    model_type, lora = request.param
    folder = tmp_path_factory.mktemp(model_type.lower())
    model = tiny(model_type)
    model.save_pretrained(str(folder / "base"))
    if lora:
        backend.peft_model(tiny(model_type)).save_pretrained(str(folder / "lora"))
    plan = make_plan(folder, model_type, lora, graph_cache=False)
    try:
        yield folder, write(plan, folder / "litert-torch.tflite", False), write(plan, folder / "ours.tflite", True)
    finally:
        plan.close()


def test_streamed_graph_computes_what_litert_torch_exports(case):
    _, reference, ours = case
    theirs, mine = outputs(reference), outputs(ours)
    assert sorted(mine) == sorted(theirs) == ["decode", f"prefill_{PREFILL}"]
    for name, expected in theirs.items():
        assert sorted(mine[name]) == sorted(expected)
        assert "logits" in mine["decode"]
        for key, value in expected.items():
            assert mine[name][key].dtype == value.dtype and np.array_equal(mine[name][key], value), (name, key)


def test_every_layer_has_its_own_weights(case):
    """Unshared: the model holds one int8 buffer per matrix (as many as litert-torch's export)."""
    from ai_edge_litert import schema_py_generated as schema

    def int8_matrices(path: Path) -> int:
        model = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
        return len({tensor.buffer for graph in model.subgraphs for tensor in graph.tensors
                    if tensor.type == schema.TensorType.INT8 and len(tensor.shape) == 2})

    _, reference, ours = case
    assert int8_matrices(ours) == int8_matrices(reference)


def test_a_placeholder_litert_torch_transforms_is_refused_not_streamed(tmp_path):
    """Gemma 2's final soft cap divides the output matrix (folded by the TFLite converter): its
    placeholder no longer names it. Streaming refuses it in one line; int8 Gemma 2 is exported whole."""
    from converter.cpu import graph, stream
    from converter.errors import ConversionError

    tiny("GEMMA2_2B").save_pretrained(str(tmp_path / "base"))
    plan = make_plan(tmp_path, "GEMMA2_2B", False, graph_cache=False)
    try:
        assert not stream.streamable(graph.model_config(plan, KV_CACHE))
        with pytest.raises(ConversionError, match=r"^litert-torch's CPU graph: litert-torch transformed a "
                                                  r"placeholder matrix \(.*\), so its int8 weights cannot be streamed$"):
            write(plan, tmp_path / "model.tflite", True)
    finally:
        plan.close()


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """Tiny Gemma 1 (base, LoRA-less) and the template litert-torch builds for it, once."""
    from converter.cpu import convert, graph

    folder = tmp_path_factory.mktemp("cache")
    backend.hf_model("GEMMA_2B").save_pretrained(str(folder / "base"))
    plan = make_plan(folder, "GEMMA_2B", False)
    template = convert._template(plan, graph.model_config(plan, KV_CACHE), None)
    plan.close()
    return folder, template


@pytest.fixture
def cache_home(gemma, tmp_path, monkeypatch):
    """XDG_CACHE_HOME in tmp_path; template builds counted (served from the one built above)."""
    from converter.cpu import convert

    built = []

    def build(*args):
        built.append(1)
        return gemma[1]

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(convert, "_template", build)
    return tmp_path / "xdg" / "lora-convert" / "cpu-graphs", built


def convert_gemma(folder: Path, out: Path, **options) -> bytes:
    plan = make_plan(folder, "GEMMA_2B", False, **options)
    try:
        return write(plan, out, True).read_bytes()
    finally:
        plan.close()


def test_cache_miss_then_hit(gemma, cache_home, tmp_path):
    where, built = cache_home
    first = convert_gemma(gemma[0], tmp_path / "a.tflite")
    assert built == [1] and sorted(p.suffix for p in where.iterdir()) == [".json", ".tflite"]
    assert convert_gemma(gemma[0], tmp_path / "b.tflite") == first and built == [1]
    entry = json.loads(next(where.glob("*.json")).read_text())
    assert entry["key"]["kv_cache_size"] == KV_CACHE and entry["key"]["prefill_length"] == PREFILL
    assert convert_gemma(gemma[0], tmp_path / "c.tflite", graph_cache=False) == first and built == [1, 1]


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "foreign key", "not JSON", "fifo"])
def test_a_damaged_or_foreign_entry_is_rebuilt(gemma, cache_home, tmp_path, damage):
    where, built = cache_home
    first = convert_gemma(gemma[0], tmp_path / "a.tflite")
    template, meta = next(where.glob("*.tflite")), next(where.glob("*.json"))
    if damage == "flipped byte":
        data = bytearray(template.read_bytes())
        data[len(data) // 2] ^= 1
        template.write_bytes(data)
    elif damage == "truncated":
        template.write_bytes(template.read_bytes()[:1000])
    elif damage == "foreign key":  # another shape's entry under this name
        entry = json.loads(meta.read_text())
        entry["key"]["kv_cache_size"] = 2 * KV_CACHE
        meta.write_text(json.dumps(entry))
    elif damage == "not JSON":
        meta.write_text("{")
    else:
        template.unlink()
        os.mkfifo(template)
    assert convert_gemma(gemma[0], tmp_path / "b.tflite") == first and built == [1, 1]
    assert convert_gemma(gemma[0], tmp_path / "c.tflite") == first and built == [1, 1]  # written again, whole


@pytest.mark.parametrize("hostile", ["a file", "read-only"])
def test_an_unwritable_cache_folder_only_costs_the_rebuild(gemma, cache_home, tmp_path, hostile):
    where, built = cache_home
    if hostile == "a file":
        where.parent.mkdir(parents=True)
        where.write_text("not a folder")
    else:
        where.mkdir(parents=True)
        where.chmod(0o500)
        if os.access(where, os.W_OK):
            pytest.skip("running as a user who writes anywhere")
    first = convert_gemma(gemma[0], tmp_path / "a.tflite")
    assert convert_gemma(gemma[0], tmp_path / "b.tflite") == first and built == [1, 1]
    assert not list(tmp_path.glob("*.partial"))


def test_the_key_follows_the_vectors_not_the_matrices(gemma, tmp_path):
    """The template holds the base's norm weights: another norm is another entry, other matrices are not."""
    from safetensors.torch import load_file, save_file

    from converter.cpu import cache, graph

    folder = gemma[0]

    def key(changed: str | None) -> dict:
        target = tmp_path / (changed or "same")
        (target / "base").mkdir(parents=True, exist_ok=True)
        for file in (folder / "base").iterdir():
            if file.suffix != ".safetensors":
                (target / "base" / file.name).write_bytes(file.read_bytes())
        tensors = load_file(folder / "base" / "model.safetensors")
        if changed:
            tensors[changed] = tensors[changed] + 1
        save_file(tensors, target / "base" / "model.safetensors", metadata={"format": "pt"})
        plan = make_plan(target, "GEMMA_2B", False)
        try:
            return cache.graph_key(plan, graph.model_config(plan, KV_CACHE))
        finally:
            plan.close()

    same = key(None)
    assert key("model.layers.1.mlp.up_proj.weight") == same
    assert key("model.layers.1.post_attention_layernorm.weight")["vectors"] != same["vectors"]


def test_no_graph_cache_is_refused_on_the_gpu_backend(tmp_path):
    from .conftest import TINY, TOKENIZER, run_convert

    result = run_convert("--model-type", "GEMMA_2B", "--input-ckpt", TINY, "--vocab-model-file", TOKENIZER,
                         "--output-dir", tmp_path / "out", "--no-graph-cache")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == "error: --no-graph-cache applies to --backend cpu only (GPU files have no graph)\n"
    assert not (tmp_path / "out").exists()
