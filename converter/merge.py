"""`--merge-lora`: the base checkpoint read with an adapter folded in, tensor by tensor.

What PEFT's `merge_and_unload` computes, in float32, for the rows the conversion asks for:
`W' = W + scale * B @ A` (embedding LoRA: `W + scale * (B @ A).T`, rows of the vocabulary);
a `modules_to_save` tensor replaces W; DoRA then rescales every output row to its magnitude,
`W'' = m / ||W'||_row * W'` (PEFT's weight norm of a `[out, in]` linear is over `in`, per output
row, so each row chunk is complete in itself). The adapter's values were checked finite when it
was loaded (converter/adapter.py). Only the small LoRA factors of the tensor being
read are held, so memory stays flat however big the model is.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .adapter import TensorMerge, canonical
from .checkpoint import TensorSource
from .models.base import ModelFamily


class MergedSource(TensorSource):
    """A base checkpoint whose adapted tensors read as their merged float32 values."""

    def __init__(self, base: TensorSource, adapter: TensorSource, merges: tuple[TensorMerge, ...],
                 family: ModelFamily | None = None):
        super().__init__(base.infos)
        self.base, self.adapter = base, adapter
        names = {canonical(name, family): name for name in base.names()}  # plan_base made sure every target is there
        self.merges: dict[str, TensorMerge] = {names[m.target]: m for m in merges}
        self._factors: tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def _read(self, key: str) -> torch.Tensor:
        shape = self.adapter.info(key).shape
        with self.adapter.rows(key, 0, shape[0] if len(shape) > 1 else 1) as values:
            return values.to(torch.float32, copy=True)

    def factors(self, name: str, merge: TensorMerge) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`(left, right, magnitude)` with `delta[rows] = left[rows] @ right`, scale folded into left;
        kept for the tensor being read only."""
        if self._factors is None or self._factors[0] != name:
            assert merge.a_key is not None and merge.b_key is not None  # only LoRA merges have factors
            a, b = self._read(merge.a_key), self._read(merge.b_key)
            left, right = (a.t(), b.t()) if merge.embedding else (b, a)
            magnitude = self._read(merge.magnitude) if merge.magnitude else None
            self._factors = (name, (left * merge.scale).contiguous(), right.contiguous(), magnitude)
        return self._factors[1:]

    @contextmanager
    def rows(self, name: str, start: int, stop: int) -> Iterator[torch.Tensor]:
        merge = self.merges.get(name)
        if merge is None:
            with self.base.rows(name, start, stop) as chunk:
                yield chunk
            return
        source, key = (self.adapter, merge.replacement) if merge.replacement else (self.base, name)
        with source.rows(key, start, stop) as chunk:
            values = chunk.to(torch.float32, copy=True)
        if merge.a_key is not None:
            left, right, magnitude = self.factors(name, merge)
            values += left[start:stop] @ right
            if magnitude is not None:
                values *= (magnitude[start:stop] / torch.linalg.norm(values, dim=1))[:, None]
        yield values

    def close(self) -> None:
        self.base.close()
