"""ConversionConfig: every option of a conversion, with its default, validated in one place.

Names follow MediaPipe's `ConversionConfig` (input_ckpt, ckpt_format, model_type, backend,
output_dir, output_tflite_file, vocab_model_file, lora_ckpt, lora_rank,
lora_output_tflite_file); the rest are ours.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ConversionError
from .files import check_input, check_name_lengths

CKPT_FORMATS = ("safetensors", "pytorch")
BACKENDS = ("gpu", "cpu")
QUANTIZATIONS = ("int8", "int4", "fp16", "fp32")
LORA_SCALINGS = ("peft", "raw")
MAX_LORA_RANK = 64  # our default bound; ranks the GPU runtime was seen to take (8, 16) are far below


def merge_mode(merge_lora: bool, merge_unsupported: bool) -> str | None:
    """None: write a LoRA file; "lora": merge what the runtime could take as LoRA; "all": merge
    everything that can be merged exactly (--merge-unsupported)."""
    if merge_unsupported and not merge_lora:
        raise ConversionError("--merge-unsupported only applies with --merge-lora")
    if not merge_lora:
        return None
    return "all" if merge_unsupported else "lora"


@dataclass(frozen=True)
class ConversionConfig:
    input_ckpt: str | Path
    ckpt_format: str
    model_type: str
    output_dir: str | Path
    vocab_model_file: str | Path
    backend: str = "gpu"
    output_tflite_file: str | Path | None = None
    lora_ckpt: str | Path | None = None
    lora_rank: int | None = None
    lora_output_tflite_file: str | Path | None = None
    quantization: str = "int8"
    mediapipe_compat: bool = False
    lora_scaling: str | None = None
    max_rank: int = MAX_LORA_RANK
    max_adapter_mb: float | None = None
    merge_lora: bool = False
    merge_unsupported: bool = False

    def __post_init__(self) -> None:
        if self.ckpt_format not in CKPT_FORMATS:
            raise ConversionError(f"--ckpt-format {self.ckpt_format!r}: expected one of {', '.join(CKPT_FORMATS)}")
        if self.backend not in BACKENDS:
            raise ConversionError(f"--backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.backend == "cpu":
            raise ConversionError("--backend cpu is not supported yet: this converter writes GPU weight files")
        if self.quantization not in QUANTIZATIONS:
            raise ConversionError(f"--quantization {self.quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
        if self.lora_scaling is not None and self.lora_scaling not in LORA_SCALINGS:
            raise ConversionError(f"--lora-scaling {self.lora_scaling!r}: expected one of {', '.join(LORA_SCALINGS)}")
        self._check_merge_options()
        if self.lora_rank is not None and self.lora_ckpt is None:
            raise ConversionError("--lora-rank needs --lora-ckpt (the adapter)")
        if self.lora_rank is not None and self.lora_rank <= 0:
            raise ConversionError(f"--lora-rank must be a positive integer, got {self.lora_rank}")
        if self.lora_output_tflite_file is not None and self.lora_ckpt is None:
            raise ConversionError("--lora-output-tflite-file needs --lora-ckpt")
        if not str(self.vocab_model_file):
            raise ConversionError("--vocab-model-file is required: the SentencePiece tokenizer.model of the base model")
        for option, given in (("--input-ckpt", self.input_ckpt), ("--vocab-model-file", self.vocab_model_file),
                              ("--lora-ckpt", self.lora_ckpt)):
            if given is not None:
                check_input(given, option, folder=True)
        if check_name_lengths(self.output_dir, "--output-dir").is_file():
            raise ConversionError(f"--output-dir {self.output_dir} is an existing file, expected a folder")

    def _check_merge_options(self) -> None:
        if merge_mode(self.merge_lora, self.merge_unsupported) is None:
            return
        if self.lora_ckpt is None:
            raise ConversionError("--merge-lora needs --lora-ckpt (the adapter to merge)")
        lora_file_options = (("--lora-rank", self.lora_rank), ("--lora-output-tflite-file", self.lora_output_tflite_file))
        for option, value in lora_file_options:
            if value is not None:
                raise ConversionError(f"--merge-lora folds the adapter into the base file and writes no LoRA file; "
                                      f"drop {option}")
        if self.mediapipe_compat or self.lora_scaling == "raw":
            raise ConversionError("--merge-lora merges what PEFT computes (alpha / r included); it cannot be combined "
                                  "with --mediapipe-compat or --lora-scaling raw")

    @property
    def merge_mode(self) -> str | None:
        return merge_mode(self.merge_lora, self.merge_unsupported)

    @property
    def output_path(self) -> Path:
        """Base weights file; MediaPipe's default is `<output_dir>/model.tflite`."""
        return Path(self.output_tflite_file) if self.output_tflite_file else Path(self.output_dir) / "model.tflite"

    @property
    def lora_output_path(self) -> Path | None:
        if self.lora_ckpt is None or self.merge_lora:
            return None
        if self.lora_output_tflite_file:
            return Path(self.lora_output_tflite_file)
        return Path(self.output_dir) / "lora.tflite"

    @property
    def effective_lora_scaling(self) -> str:
        """PEFT's alpha/r folded in by default; MediaPipe's raw tensors in compat mode."""
        if self.lora_scaling is not None:
            return self.lora_scaling
        return "raw" if self.mediapipe_compat else "peft"
