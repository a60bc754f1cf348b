"""Registry of model families; each lives in its own module as data."""
from __future__ import annotations

from ..errors import ConversionError
from . import falcon, gemma, gemma2, gemma3, llama3, phi2, qwen2, stablelm
from .base import ModelFamily, ModelType

FAMILIES: tuple[ModelFamily, ...] = (gemma.FAMILY, gemma2.FAMILY, gemma3.FAMILY, phi2.FAMILY, falcon.FAMILY,
                                     stablelm.FAMILY, llama3.FAMILY, qwen2.FAMILY)


def model_type_names() -> list[str]:
    return [t.name for family in FAMILIES for t in family.model_types]


def lora_model_type_names() -> list[str]:
    return [t.name for family in FAMILIES if family.lora for t in family.model_types if t.lora]


def find_model_type(name: str) -> tuple[ModelFamily, ModelType]:
    """The family and model type for a MediaPipe model type name such as GEMMA_2B."""
    for family in FAMILIES:
        for model_type in family.model_types:
            if model_type.name == name:
                return family, model_type
    raise ConversionError(f"--model-type {name} is not supported; choose one of {', '.join(model_type_names())}")
