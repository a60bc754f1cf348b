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
DEFAULT_KV_CACHE_SIZE = 1024  # --backend cpu: prompt + output positions (LiteRT-LM's max_num_tokens up to this)
DEFAULT_PREFILL_LENGTH = 256  # --backend cpu: prompt tokens per prefill step
MAX_CPU_POSITIONS = 1 << 17
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
    kv_cache_size: int | None = None  # --backend cpu: positions the graph's KV cache holds
    prefill_length: int | None = None  # --backend cpu: tokens the prefill signature takes at a time
    graph_cache: bool = True  # --backend cpu, int8: reuse the graph template built for this shape (cpu/cache.py)

    def __post_init__(self) -> None:
        if self.ckpt_format not in CKPT_FORMATS:
            raise ConversionError(f"--ckpt-format {self.ckpt_format!r}: expected one of {', '.join(CKPT_FORMATS)}")
        if self.backend not in BACKENDS:
            raise ConversionError(f"--backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        self._check_cpu_options()
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

    def _check_cpu_options(self) -> None:
        sizes = (("--kv-cache-size", self.kv_cache_size), ("--prefill-length", self.prefill_length))
        if self.backend != "cpu":
            for option, value in sizes:
                if value is not None:
                    raise ConversionError(f"{option} applies to --backend cpu only (the GPU runtime sizes its cache)")
            if not self.graph_cache:
                raise ConversionError("--no-graph-cache applies to --backend cpu only (GPU files have no graph)")
            return
        if self.mediapipe_compat:
            raise ConversionError("--mediapipe-compat reproduces MediaPipe's GPU files; it does not apply to --backend cpu")
        for option, value in sizes:
            if value is not None and not 1 <= value <= MAX_CPU_POSITIONS:
                raise ConversionError(f"{option} {value}: expected 1 to {MAX_CPU_POSITIONS}")
        if self.cpu_prefill_length > self.cpu_kv_cache_size:
            raise ConversionError(f"--prefill-length {self.cpu_prefill_length} is above --kv-cache-size "
                                  f"{self.cpu_kv_cache_size}: a prefill step writes that many cache positions")

    @property
    def cpu_kv_cache_size(self) -> int:
        return self.kv_cache_size if self.kv_cache_size is not None else DEFAULT_KV_CACHE_SIZE

    @property
    def cpu_prefill_length(self) -> int:
        return self.prefill_length if self.prefill_length is not None else min(DEFAULT_PREFILL_LENGTH,
                                                                                self.cpu_kv_cache_size)

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
