"""Virtual tensors cut out of fused checkpoint tensors, readable in row ranges like real ones.

Falcon stores q, k and v of a layer as one `query_key_value` tensor whose rows interleave the
three per head; each output tensor is the view `fused.reshape(-1, parts, block)[:, part]`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from .checkpoint import TensorInfo, TensorSource
from .errors import ConversionError


@dataclass(frozen=True)
class Slice:
    source: str
    part: int
    parts: int
    block: int

    def physical_row(self, row: int) -> int:
        return (row // self.block) * self.parts * self.block + self.part * self.block + row % self.block


class SplittingSource(TensorSource):
    """A checkpoint source plus named slices of its fused tensors."""

    def __init__(self, inner: TensorSource):
        super().__init__(dict(inner.infos))
        self.inner = inner
        self.slices: dict[str, Slice] = {}

    def add_slice(self, source: str, part: int, parts: int, block: int) -> str:
        """Register `source`'s part `part` of `parts` (in blocks of `block` rows); returns its name."""
        name = f"{source}[{part}:{parts}]"
        info = self.inner.info(source)
        if block <= 0 or info.shape[0] % (parts * block):
            raise ConversionError(f"tensor {source} has {info.shape[0]} rows, not groups of {parts} x {block} "
                                  f"(parts x rows per head) to split; check the heads and head size in config.json")
        self.slices[name] = Slice(source, part, parts, block)
        self.infos[name] = TensorInfo(name, (info.shape[0] // parts, *info.shape[1:]), info.dtype, info.file)
        return name

    @contextmanager
    def rows(self, name: str, start: int, stop: int) -> Iterator[torch.Tensor]:
        cut = self.slices.get(name)
        if cut is None:
            with self.inner.rows(name, start, stop) as chunk:
                yield chunk
            return
        if len(self.infos[name].shape) == 1:
            start, stop = 0, self.infos[name].shape[0]
        first, last = cut.physical_row(start), cut.physical_row(stop - 1)
        wanted = torch.tensor([cut.physical_row(r) - first for r in range(start, stop)])
        fused_shape = self.inner.info(cut.source).shape
        if len(fused_shape) == 1:
            with self.inner.rows(cut.source, 0, 1) as vector:
                yield vector[wanted + first].clone()
            return
        with self.inner.rows(cut.source, first, last + 1) as chunk:
            yield chunk.index_select(0, wanted)

    def close(self) -> None:
        self.inner.close()
