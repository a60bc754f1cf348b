"""BundleConfig: the options of a bundle, named as in MediaPipe's `BundleConfig`, checked once."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from converter.errors import ConversionError

FORMATS = ("task", "litertlm")
MAX_TEXT_BYTES = 256 << 10  # per token or prompt option: ~64k tokens, beyond any on-device context


def check_text(text: str, option: str) -> None:
    """Text that goes into the bundle's protobufs: valid UTF-8 (argv bytes that are not arrive as
    surrogates) and bounded."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ConversionError(f"{option} {text[:40]!r}: not valid UTF-8 (at character {exc.start})") from None
    if size > MAX_TEXT_BYTES:
        raise ConversionError(f"{option}: {size:,} bytes, more than the {MAX_TEXT_BYTES >> 10} KiB allowed")


@dataclass(frozen=True)
class BundleConfig:
    tflite_model: str | Path
    tokenizer_model: str | Path
    start_token: str | None  # None: no start token (--no-start-token, .litertlm only)
    stop_tokens: list[str]
    output_filename: str | Path
    enable_bytes_to_unicode_mapping: bool = False
    system_prompt: str | None = None
    prompt_prefix: str | None = None
    prompt_suffix: str | None = None
    format: str = "task"

    def __post_init__(self) -> None:
        if not isinstance(self.stop_tokens, (list, tuple)) or not self.stop_tokens:
            raise ConversionError("--stop-tokens: give at least one stop token")
        if self.start_token is None and self.format != "litertlm":
            raise ConversionError("--no-start-token applies to --format litertlm only (MediaPipe puts a start token "
                                  "before each prompt); give --start-token")
        if self.enable_bytes_to_unicode_mapping and self.format == "litertlm":
            raise ConversionError("--enable-bytes-to-unicode-mapping applies to --format task only (a .litertlm's "
                                  "Hugging Face tokenizer section maps bytes itself)")
        if self.start_token is not None and not self.start_token:
            raise ConversionError("--start-token is required (e.g. <bos>)")
        texts = [("--start-token", self.start_token), *(("--stop-tokens", t) for t in self.stop_tokens),
                 ("--system-prompt", self.system_prompt), ("--prompt-prefix", self.prompt_prefix),
                 ("--prompt-suffix", self.prompt_suffix)]
        for option, text in texts:
            if text is not None:
                check_text(text, option)
        if self.format not in FORMATS:
            raise ConversionError(f"--format {self.format!r}: expected one of {', '.join(FORMATS)}")

    @property
    def output_path(self) -> Path:
        """MediaPipe appends `.task` when it is missing; `.litertlm` likewise for that format."""
        path = Path(self.output_filename)
        suffix = f".{self.format}"
        return path if path.name.endswith(suffix) else path.with_name(path.name + suffix)
