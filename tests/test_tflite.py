"""The GPU weights flatbuffer: layout rules, round trip through the reader, atomic writes."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

from converter import files, tflite
from converter.errors import ConversionError

METADATA = [
    (tflite.LLM_PARAMETERS, b"\x10\x80\x04"),
    (tflite.SPM_VOCAB_MODEL, b"tokenizer-bytes" * 10),
    (tflite.LLM_MODEL_TYPE, 6),
    (tflite.BACKEND, b"gpu"),
    (tflite.LORA_RANK, 8),
]
TENSORS = [
    tflite.TensorSpec("a.w", tflite.INT8, 1000),
    tflite.TensorSpec("a.w.sum_i", tflite.INT32, 40),
    tflite.TensorSpec("norm.scale", tflite.FLOAT32, 12),
]


def write(path: Path, tensors=TENSORS, metadata=METADATA) -> None:
    with tflite.WeightFileWriter(path, "GEMMA_2B", tensors, metadata) as writer:
        for index, spec in enumerate(tensors):
            writer.write(spec.name, np.full(spec.nbytes, index + 1, dtype=np.uint8))


def test_round_trip_and_layout(tmp_path):
    path = tmp_path / "w.bin"
    write(path)
    weights = tflite.WeightFile(path)
    assert weights.subgraph_name == "GEMMA_2B"
    assert list(weights.tensors) == [t.name for t in TENSORS]
    assert weights.metadata == dict(METADATA)
    for index, spec in enumerate(TENSORS):
        entry = weights.tensors[spec.name]
        assert entry.type == spec.type and entry.nbytes == spec.nbytes and entry.offset % 256 == 0
        assert (np.asarray(weights.raw(spec.name)) == index + 1).all()
    size = path.stat().st_size
    assert size % 65536 == 0 and size >= tflite.MIN_FILE_SIZE
    data = path.read_bytes()
    assert data[4:8] == b"TFL3"

    model = schema.Model.GetRootAs(data, 0)
    assert model.Version() == 3 and model.OperatorCodesLength() == 0
    assert model.Buffers(0).Size() == 0 and model.Buffers(0).DataLength() == 0
    first_blob = model.Buffers(1)
    assert first_blob.Offset() == 65536 and first_blob.DataLength() == 0  # data stays outside the flatbuffer
    tensor = model.Subgraphs(0).Tensors(0)
    assert tensor.ShapeAsNumpy().tolist() == [1000] and tensor.HasRank() and tensor.Buffer() == 4
    assert model.Subgraphs(0).Tensors(2).Type() == schema.TensorType.FLOAT32


def test_data_starts_after_a_flatbuffer_larger_than_64k(tmp_path):
    tensors = [tflite.TensorSpec(f"params.lm.transformer.x_layers_{i}.some.long.tensor.name.w", tflite.INT8, 16)
               for i in range(1500)]
    layout = tflite.plan_layout("GEMMA_2B", tensors, METADATA)
    assert len(layout.flatbuffer) > 65536
    assert layout.blob_offsets[0] == tflite.roundup(len(layout.flatbuffer), 65536)


def test_column_blocks_land_in_their_rows(tmp_path):
    path = tmp_path / "w.bin"
    spec = tflite.TensorSpec("t", tflite.INT8, 24)  # seen as 3 rows of 8 bytes
    with tflite.WeightFileWriter(path, "GEMMA_2B", [spec], METADATA) as writer:
        block = np.arange(24, dtype=np.uint8).reshape(3, 8)
        writer.write_columns("t", block[:, :5], 0)
        writer.write_columns("t", block[:, 5:], 5)
    assert np.asarray(tflite.WeightFile(path).raw("t")).tolist() == list(range(24))


def test_staged_blocks_are_written_in_the_background_into_their_columns(tmp_path):
    path = tmp_path / "w.bin"
    spec = tflite.TensorSpec("t", tflite.INT8, 4 * 64)  # seen as 4 rows of 64 bytes, filled 8 columns a stage
    expected = np.random.default_rng(0).integers(0, 256, (4, 64), dtype=np.uint8)
    with tflite.WeightFileWriter(path, "GEMMA_2B", [spec], METADATA) as writer:
        for column in range(0, 64, 8):
            stage = writer.stage(4, 8)
            stage[:] = expected[:, column:column + 8]
            writer.write_stage("t", stage, column)
        assert writer._buffers <= tflite.STAGES  # buffers are reused once written
    assert np.array_equal(np.asarray(tflite.WeightFile(path).raw("t")).reshape(4, 64), expected)


def test_writeback_starts_once_per_tensor_when_all_its_bytes_are_written(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    specs = [tflite.TensorSpec("t", tflite.INT8, 4 * 64), tflite.TensorSpec("s", tflite.FLOAT32, 16)]
    expected = np.random.default_rng(1).integers(0, 256, (4, 64), dtype=np.uint8)
    started = []  # (offset, length, the file's bytes there at that moment)
    monkeypatch.setattr(tflite, "start_writeback",
                        lambda fd, offset, length: started.append((offset, length, os.pread(fd, length, offset))))
    with tflite.WeightFileWriter(path, "GEMMA_2B", specs, METADATA) as writer:
        for column in range(0, 64, 16):
            assert started == []
            stage = writer.stage(4, 16)
            stage[:] = expected[:, column:column + 16]
            writer.write_stage("t", stage, column)
        writer.write("s", np.arange(2, dtype=np.float32))
        writer.write("s", np.arange(2, 4, dtype=np.float32), 8)
    stored = tflite.WeightFile(path)
    assert sorted(started) == [(stored.entry("t").offset, 256, expected.tobytes()),  # in either order: two threads
                               (stored.entry("s").offset, 16, np.arange(4, dtype=np.float32).tobytes())]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_start_writeback_keeps_the_bytes(tmp_path):
    data = np.random.default_rng(2).integers(0, 256, 8 << 20, dtype=np.uint8)
    with open(tmp_path / "f", "wb") as handle:
        handle.write(data.tobytes())
        handle.flush()
        files.start_writeback(handle.fileno(), 0, data.nbytes)
        os.fsync(handle.fileno())
    assert (tmp_path / "f").read_bytes() == data.tobytes()
    assert files._sync_file_range is not None


def test_a_failed_background_write_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    spec = tflite.TensorSpec("t", tflite.INT8, 64)
    with pytest.raises(ConversionError, match=f"^{path}: cannot write \\(No space left on device\\)$"):
        with tflite.WeightFileWriter(path, "GEMMA_2B", [spec], METADATA) as writer:
            def full(fd, data, offset):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(tflite.os, "pwrite", full)
            writer.write_stage("t", np.zeros((1, 64), np.uint8), 0)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "w.bin"
    with pytest.raises(RuntimeError):
        with tflite.WeightFileWriter(path, "GEMMA_2B", TENSORS, METADATA) as writer:
            writer.write("a.w", np.ones(1000, dtype=np.uint8))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_reader_rejects_non_tflite_and_truncated_files(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(ConversionError, match="no TFL3"):
        tflite.WeightFile(junk)
    path = tmp_path / "w.bin"
    write(path)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(path.read_bytes()[:65600])
    with pytest.raises(ConversionError, match="beyond the end"):
        tflite.WeightFile(truncated)
