"""Products with a quantized matrix read straight from its stored tile4 bytes (the weights file's
memory map): nothing is copied or repacked at load, and the weights stay int8/int4 in memory.

The stored bytes of an int8 `[O, I]` matrix are `[I/4, O/4, 4(c), 4(r)]`: `W[4t + r, 4a + c]`
is byte `(a, t, c, r)`, stored as `q + 128` (int4: two values a byte, `[I/4, O/4, 4(c), 2(h)]`,
`r = 2h` in the low nibble and `r = 2h + 1` in the high one, stored as `q + 8`); row `o` is
multiplied by `scale[o]` (converter/quantize.py writes them).

- A few rows (generating: one token): a compiled kernel (numba) reads each stored byte once and
  accumulates in tile space, `acc[t, c, r] += x[4a + c] * q(a, t, c, r)` over `a`, then sums over
  `c`; blocks of outputs run in parallel. Its inner loop is a flat multiply-add over a run of
  stored bytes against the activations repeated in the bytes' pattern, which LLVM vectorizes
  (8 float32 lanes on AVX2).
- More rows (a prompt): blocks of outputs are widened to float32 into a scratch matrix laid out as
  `W.T`'s columns, `x @ block` runs as float32 sgemm, and the block is reused for every row.

Both multiply float32 activations by the stored integers exactly (`q` is exact in float32) and add
in float32, so each output is a float32 dot product of `x` and the stored row, then times its
scale: the error is at most `(I + 2) * 2^-24 * sum_i |x_i| |W_oi|` (worst case of float32
summation; typically far less), the bound of any float32 matmul of the same length. Without
numba the prompt path serves every row count (correct, slower for one row).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from converter import quantize

try:
    import numba
except ImportError:  # the sgemm path serves every row count
    numba = None  # type: ignore[assignment]

TILE = quantize.TILE
RUN = 128  # bytes multiplied by one repeated activation pattern (8 int8 tiles, 16 int4 ones)
BLOCK = 1024  # int4: stored bytes per row of `a` in one parallel block of outputs
SLAB = 1 << 16  # int8: stored bytes per row of `a` in one pass (its float32 accumulators: 256 KiB, in L2)
KERNEL_ROWS = 4  # rows up to which the compiled kernel runs (one pass over the bytes per row)
COLUMNS = 128  # outputs widened per sgemm block (measured best of 16-512 on 2048- and 16384-wide rows)


def _matvec8(data: np.ndarray, pattern: np.ndarray, out: np.ndarray, parts: int) -> None:
    """int8 tile4 bytes `data` [I/4, 4*O] times the activations' `pattern` [I/4, RUN] (each `x[4a + c]`
    repeated 4 times, c = 0..3, repeated RUN/16 times) -> `out` [O] (unscaled). Each of `parts` threads takes a
    contiguous share of the rows `a` (so each reads one unbroken stretch of the file) into its own
    accumulators, a slab of SLAB bytes' width at a time (accumulators that stay in L2), four rows per
    pass over them; the threads' sums are added at the end."""
    rows, width = data.shape
    share = (rows + parts - 1) // parts
    acc = np.zeros((parts, width), np.float32)
    for part in numba.prange(parts):
        first, last = min(rows, part * share), min(rows, (part + 1) * share)
        quads = last - (last - first) % 4
        for start in range(0, width, SLAB):
            end = min(width, start + SLAB)
            for a in range(first, quads, 4):
                x0, x1, x2, x3 = pattern[a], pattern[a + 1], pattern[a + 2], pattern[a + 3]
                for run in range(start, end, RUN):
                    stop = min(end, run + RUN)
                    s0, s1 = data[a, run: stop], data[a + 1, run: stop]
                    s2, s3 = data[a + 2, run: stop], data[a + 3, run: stop]
                    into = acc[part, run: stop]
                    for j in range(stop - run):
                        into[j] += (x0[j] * np.float32(np.int32(s0[j]) - 128) + x1[j] * np.float32(np.int32(s1[j]) - 128)) + \
                            (x2[j] * np.float32(np.int32(s2[j]) - 128) + x3[j] * np.float32(np.int32(s3[j]) - 128))
            for a in range(quads, last):
                x = pattern[a]
                for run in range(start, end, RUN):
                    stop = min(end, run + RUN)
                    piece, into = data[a, run: stop], acc[part, run: stop]
                    for j in range(stop - run):
                        into[j] += x[j] * np.float32(np.int32(piece[j]) - 128)
    for t in numba.prange(width // 16):
        for r in range(4):
            total = np.float32(0)
            for part in range(parts):
                total += (acc[part, 16 * t + r] + acc[part, 16 * t + 4 + r]) + \
                    (acc[part, 16 * t + 8 + r] + acc[part, 16 * t + 12 + r])
            out[4 * t + r] = total


def _matvec4(data: np.ndarray, pattern: np.ndarray, out: np.ndarray) -> None:
    """int4 tile4 bytes `data` [I/4, 2*O] times `pattern` [I/4, RUN] (each `x[4a + c]` twice, c = 0..3,
    repeated RUN/8 times) -> `out` [O] (unscaled): low and high nibbles accumulate apart."""
    rows, width = data.shape
    blocks = (width + BLOCK - 1) // BLOCK
    for block in numba.prange(blocks):
        start = block * BLOCK
        count = min(BLOCK, width - start)
        low = np.zeros(count, np.float32)
        high = np.zeros(count, np.float32)
        for a in range(rows):
            stored = data[a, start: start + count]
            x = pattern[a]
            for run in range(0, count, RUN):
                piece = stored[run: run + RUN]
                into_low = low[run: run + RUN]
                into_high = high[run: run + RUN]
                for j in range(len(piece)):
                    byte = np.int32(piece[j])
                    into_low[j] += x[j] * np.float32((byte & 15) - 8)
                    into_high[j] += x[j] * np.float32((byte >> 4) - 8)
        for t in range(count // 8):
            for h in range(2):
                base = start // 2 + 4 * t + 2 * h
                out[base] = (low[8 * t + h] + low[8 * t + 2 + h]) + (low[8 * t + 4 + h] + low[8 * t + 6 + h])
                out[base + 1] = (high[8 * t + h] + high[8 * t + 2 + h]) + (high[8 * t + 4 + h] + high[8 * t + 6 + h])


def _widen(data: np.ndarray, start: int, count: int, bits: int, block: np.ndarray, words: np.ndarray) -> None:
    """Output tiles `start .. start + count` of the tile4 bytes `data` [I/4, O/4, 4, bits/2] as float32
    `block` [I/4, 4(c) * count * 4(r)]: rows `4a + c` of `W.T` (unscaled), columns `4t + r`. Per `a`,
    each c's bytes of a tile (one `words` item) move to c-major order, then all widen in one flat
    (vectorized) loop; rows of `a` in parallel. `words` [I/4, >= 4 * count, bits/2] is a work buffer."""
    rows = data.shape[0]
    offset = np.float32(2 ** (bits - 1))
    for a in numba.prange(rows):
        mine = words[a, :4 * count]
        stored = mine.reshape(-1)
        for c in range(4):
            for t in range(count):
                mine[c * count + t] = data[a, start + t, c]
        into = block[a]
        if bits == 8:
            for j in range(len(stored)):
                into[j] = np.float32(stored[j]) - offset
        else:
            for j in range(len(stored)):
                into[2 * j] = np.float32(stored[j] & 15) - offset
                into[2 * j + 1] = np.float32(stored[j] >> 4) - offset


def _compile(kernel, parallel: bool = True):
    if numba is None:
        return None
    try:
        return numba.njit(cache=True, parallel=parallel, nogil=True, fastmath={"contract"})(kernel)
    except RuntimeError:  # no writable cache folder: compiled again in each process
        return numba.njit(parallel=parallel, nogil=True, fastmath={"contract"})(kernel)


def _threaded(kernel):
    """`kernel(data, pattern, out)` on numba's current thread count (passed in: a compiled function that
    asked numba for it could not be cached)."""
    return None if kernel is None else lambda data, pattern, out: kernel(data, pattern, out, numba.get_num_threads())


KERNELS = {8: _threaded(_compile(_matvec8)), 4: _compile(_matvec4)}
WIDEN = _compile(_widen)


@dataclass(frozen=True)
class TiledLinear:
    """A quantized `[out_features, in_features]` matrix as its stored tile4 bytes `data` (uint8, flat,
    usually the file's memory map) and row `scale`s: `linear(x)` is `x @ (q * scale[:, None]).T`."""

    data: np.ndarray
    scale: torch.Tensor  # float32 [out]
    bits: int
    out_features: int
    in_features: int

    @property
    def grid(self) -> np.ndarray:
        """The bytes as `[I/4, O/4, 4, 4]` (int8) or `[I/4, O/4, 4, 2]` (int4)."""
        return self.data.reshape(self.in_features // TILE, self.out_features // TILE, TILE, self.bits // 2)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W in float32, gathered from the stored bytes (an embedding held once: the
        output projection's bytes)."""
        index, grid = ids.numpy(), self.grid
        if self.bits == 8:  # [n, I/4, 4]: W[o, 4a + c] sits at tile (a, o // 4), place (c, o % 4)
            stored = grid[:, index // 4, :, index % 4]
        else:  # two values a byte, the even output in the low nibble
            pairs = grid[:, index // 4, :, index % 4 // 2]
            stored = pairs >> (4 * (index % 2))[:, None, None] & 0x0F
        values = stored.astype(np.int16) - 2 ** (self.bits - 1)
        return torch.from_numpy(values.reshape(len(index), -1)).to(torch.float32) * self.scale[ids, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.float32)
        kernel = KERNELS[self.bits]
        if numba is not None:
            numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
        if kernel is not None and rows.shape[0] <= KERNEL_ROWS:
            y = torch.stack([self._kernel_row(kernel, row) for row in rows])
        else:
            y = self._blocked(rows)
        return y.mul_(self.scale).view(*x.shape[:-1], self.out_features)

    def _kernel_row(self, kernel, row: torch.Tensor) -> torch.Tensor:
        repeat = self.bits // 2  # each x[4a + c] covers 4 (int8) or 2 (int4) bytes of a tile
        pattern = row.view(-1, TILE).repeat_interleave(repeat, 1).repeat(1, RUN // (TILE * repeat))
        out = torch.empty(self.out_features)
        kernel(self.data.reshape(self.in_features // TILE, -1), pattern.numpy(), out.numpy())
        return out

    def _blocked(self, rows: torch.Tensor) -> torch.Tensor:
        """Float32 sgemm over blocks of outputs widened from the stored bytes (`W.T`'s columns)."""
        inputs, outputs = self.in_features, self.out_features
        tiles = COLUMNS // TILE
        grid = self.grid
        words = np.empty((inputs // TILE, TILE * tiles, self.bits // 2), np.uint8)
        scratch = torch.empty(inputs * tiles * TILE)
        y = torch.empty(rows.shape[0], outputs)
        for start in range(0, outputs // TILE, tiles):
            count = min(tiles, outputs // TILE - start)
            block = scratch[:inputs * count * TILE].view(inputs // TILE, TILE, count, TILE)
            if WIDEN is not None:
                WIDEN(grid, start, count, self.bits, block.numpy().reshape(inputs // TILE, -1), words)
            else:
                _widen_torch(grid, start, count, self.bits, block)
            y[:, TILE * start: TILE * (start + count)] = rows @ block.view(inputs, count * TILE)
        return y


def _widen_torch(grid: np.ndarray, start: int, count: int, bits: int, block: torch.Tensor) -> None:
    """`_widen` in torch (no numba)."""
    stored = torch.from_numpy(grid[:, start: start + count]).permute(0, 2, 1, 3)  # [a, c, t, bytes]
    block.copy_(stored if bits == 8 else quantize.unpack_int4(stored))
    block.sub_(2 ** (bits - 1))
