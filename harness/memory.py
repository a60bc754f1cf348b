"""What a generation needs in memory on the reference runtime, and what the machine has free."""
from __future__ import annotations

from pathlib import Path

from converter.models.base import Dims

FLOAT = 4  # the runtime's activations and KV cache are float32
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")  # cgroup v2: memory.max and memory.current of this process's group


def generation_bytes(dims: Dims, max_tokens: int, prompt_tokens: int) -> int:
    """About the most memory generating adds to the loaded weights: the KV cache for `max_tokens`
    positions, plus the largest of one layer's temporaries: the prompt's attention scores (three
    [heads, prompt, prompt] copies: scores, mask, softmax), its MLP activations, or one decoding
    step's keys and values repeated to every head next to the cache's growing copy."""
    cache = 2 * dims.num_layers * max_tokens * dims.kv_size * FLOAT
    prefill = (3 * dims.num_heads * prompt_tokens * prompt_tokens + 2 * prompt_tokens * dims.q_size
               + 3 * prompt_tokens * dims.intermediate_size) * FLOAT
    decode = (2 * max_tokens * (dims.q_size + dims.kv_size) + 3 * dims.num_heads * max_tokens) * FLOAT
    return cache + max(prefill, decode)


def available_bytes() -> int | None:
    """Memory this process can still take: the kernel's MemAvailable, lowered to what is left under
    a cgroup v2 limit; None where neither can be read (not Linux)."""
    known = []
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                known.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            known.append(int(limit) - int((CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(min(known), 0) if known else None


def size_text(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"
