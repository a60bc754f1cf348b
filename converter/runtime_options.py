"""MediaPipe LLM Inference's generation options and their defaults, stated once."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeOptions:
    """maxTokens is the KV-cache size (start token + prompt + output), not the output length."""

    max_tokens: int = 512
    top_k: int = 40
    temperature: float = 0.8
    random_seed: int = 0

    def as_mediapipe(self) -> dict:
        """The option names LlmInferenceOptions uses (for manifests)."""
        return {"maxTokens": self.max_tokens, "topK": self.top_k, "temperature": self.temperature,
                "randomSeed": self.random_seed}


DEFAULTS = RuntimeOptions()
