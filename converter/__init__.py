"""Hugging Face checkpoints + LoRA adapters -> MediaPipe / LiteRT-LM GPU weight files."""
from .config import ConversionConfig
from .convert import ConversionResult, convert
from .errors import ConversionError

__all__ = ["ConversionConfig", "ConversionError", "ConversionResult", "convert"]
