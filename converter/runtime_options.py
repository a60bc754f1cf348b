"""MediaPipe LLM Inference's generation options and their defaults, stated once, checked once."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConversionError

INT32_MAX = 2**31 - 1  # LlmInferenceOptions holds every option in an int32 / float32 field


@dataclass(frozen=True)
class RuntimeOptions:
    """maxTokens is the KV-cache size (start token + prompt + output), not the output length.
    Constructing one with a value the runtime cannot take raises ConversionError naming the option."""

    max_tokens: int = 512
    top_k: int = 40
    temperature: float = 0.8
    random_seed: int = 0

    def __post_init__(self) -> None:
        for option, value in (("--max-tokens", self.max_tokens), ("--top-k", self.top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= INT32_MAX:
                raise ConversionError(f"{option} {value!r}: expected an integer from 1 to {INT32_MAX}")
        if isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int) \
                or not -INT32_MAX - 1 <= self.random_seed <= INT32_MAX:
            raise ConversionError(f"--random-seed {self.random_seed!r}: expected a 32-bit integer "
                                  f"({-INT32_MAX - 1} to {INT32_MAX})")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConversionError(f"--temperature {self.temperature!r}: expected a finite number >= 0 (0: greedy)")

    def as_mediapipe(self) -> dict:
        """The option names LlmInferenceOptions uses (for manifests)."""
        return {"maxTokens": self.max_tokens, "topK": self.top_k, "temperature": self.temperature,
                "randomSeed": self.random_seed}


DEFAULTS = RuntimeOptions()
