"""`lora-run --compare`: our reference runtime next to transformers (+ PEFT), layer by layer.

Both models run the same prompt tokens. For the scaled embeddings, each decoder layer's output,
the final norm's output and the logits, the report gives the largest and mean absolute
difference, and a relative difference of what that step itself added (for a layer: its update
to the residual stream, whose size does not hide behind the stream's): mean |ours - theirs| /
mean |theirs|. The first row whose relative difference passes the tolerance of the file's weight
encoding is where the conversion goes wrong.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from bundler.task import open_weights
from converter.errors import ConversionError
from converter.tflite import FLOAT16, INT4, INT8

from .generate import LoadedModel, load, prompt_ids

# Mean |ours - transformers| / mean |transformers| that a correct file stays below, per encoding
# (measured on random tiny Gemmas: fp32 1e-8, fp16 2e-4, int8 1e-2, int4 0.2). LoRA halves are
# stored as fp16, so with a LoRA the tolerance is at least fp16's.
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "int8": 5e-2, "int4": 0.5}
INSTALL_HINT = "--compare needs transformers and peft: pip install 'lora-convert[compare]'"


@dataclass(frozen=True)
class Row:
    name: str
    max_abs: float
    mean_abs: float
    relative: float  # of what the row adds: mean |ours - transformers| / mean |transformers|


@dataclass(frozen=True)
class Report:
    rows: list[Row]
    encoding: str  # what the tolerance was chosen for, e.g. "int8 + fp16 LoRA"
    tolerance: float
    ours_next: int
    theirs_next: int

    @property
    def first_bad(self) -> Row | None:
        return next((row for row in self.rows if row.relative > self.tolerance), None)


def tolerance_for(encoding: str, lora: bool) -> float:
    return max(TOLERANCES[encoding], TOLERANCES["fp16"]) if lora else TOLERANCES[encoding]


def encoding_of(model_path: Path) -> str:
    """The least precise weight encoding in a weights file: int4, int8, fp16 or fp32."""
    weights, _ = open_weights(Path(model_path))
    types = {entry.type for entry in weights.tensors.values()}
    return next((name for name, kind in (("int4", INT4), ("int8", INT8), ("fp16", FLOAT16)) if kind in types), "fp32")


def load_transformers(model_dir: Path, lora_dir: Path | None = None) -> torch.nn.Module:
    """The Hugging Face checkpoint in float32, with the PEFT adapter applied if given."""
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as transformers_logging
        if lora_dir is not None:
            from peft import PeftModel
    except ImportError:
        raise ConversionError(INSTALL_HINT) from None
    transformers_logging.disable_progress_bar()
    for option, directory, config in (("--hf-model", model_dir, "config.json"),
                                      ("--hf-lora", lora_dir, "adapter_config.json")):
        if directory is not None and not (Path(directory) / config).is_file():
            raise ConversionError(f"{option} {directory}: no {config} there (expected a local directory)")
    transformers_logging.set_verbosity_error()  # its multi-line load report: our error line says what failed
    try:  # transformers and PEFT raise many kinds of errors on a bad checkpoint: each one is the user's input
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    except Exception as exc:
        reason = "its weights do not have the shapes its config.json gives" \
            if "ignore_mismatched_sizes" in str(exc) else first_line(exc)
        raise ConversionError(f"--hf-model {model_dir}: transformers cannot load it ({reason})") from None
    if lora_dir is not None:
        try:
            with warnings.catch_warnings():  # transformers' deprecation notices about PEFT's calls
                warnings.simplefilter("ignore", FutureWarning)
                model = PeftModel.from_pretrained(model, str(lora_dir))
        except Exception as exc:
            raise ConversionError(f"--hf-lora {lora_dir}: PEFT cannot load it ({first_line(exc)})") from None
    return model.eval()


def first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _row(name: str, ours: torch.Tensor, theirs: torch.Tensor, own_ours: torch.Tensor, own_theirs: torch.Tensor) -> Row:
    """Differences of a hidden state, and relative difference of what this step itself added."""
    difference = (ours - theirs).abs()
    relative = float((own_ours - own_theirs).abs().mean()) / max(float(own_theirs.abs().mean()), 1e-30)
    return Row(name, float(difference.max()), float(difference.mean()), relative)


def transformers_states(hf_model: torch.nn.Module, ids: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """transformers' scaled embeddings, each decoder layer's output, the final norm's output; logits."""
    outputs: list[torch.Tensor] = []
    try:
        layers = hf_model.get_decoder().layers
    except AttributeError:
        raise ConversionError(f"--hf-model: {type(hf_model).__name__} has no decoder layers to compare") from None
    hooks = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in layers]
    try:
        with torch.no_grad():
            result = hf_model(torch.tensor([ids]), output_hidden_states=True)
    except (RuntimeError, IndexError, ValueError) as exc:
        raise ConversionError(f"--hf-model: transformers fails on the prompt's tokens ({first_line(exc)})") from None
    finally:
        for hook in hooks:
            hook.remove()
    states = [result.hidden_states[0], *outputs, result.hidden_states[-1]]
    return [state[0].float() for state in states], result.logits[0].float()


def compare(loaded: LoadedModel, hf_model: torch.nn.Module, ids: list[int], encoding: str, tolerance: float) -> Report:
    """Run both models on `ids` and difference every hidden state and the logits."""
    ours: list[torch.Tensor] = []
    with torch.no_grad():
        ours_logits, _ = loaded.model.forward(ids, hidden=ours)
    theirs, theirs_logits = transformers_states(hf_model, ids)
    if len(theirs) != len(ours):
        raise ConversionError(f"transformers runs {len(theirs) - 2} layers, the weights file has {len(ours) - 2}: "
                              "not the same model")
    for what, mine, other in (("hidden states", ours[0], theirs[0]), ("logits", ours_logits, theirs_logits)):
        if mine.shape != other.shape:
            raise ConversionError(f"transformers' {what} have shape {list(other.shape)}, the weights file's "
                                  f"{list(mine.shape)}: not the same model")
    layers = len(ours) - 2
    rows = [_row("embeddings", ours[0], theirs[0], ours[0], theirs[0])]
    rows += [_row(f"layer {i}", ours[i + 1], theirs[i + 1], ours[i + 1] - ours[i], theirs[i + 1] - theirs[i])
             for i in range(layers)]
    rows.append(_row("final norm", ours[-1], theirs[-1], ours[-1], theirs[-1]))
    rows.append(_row("logits", ours_logits, theirs_logits, ours_logits, theirs_logits))
    return Report(rows, encoding, tolerance, int(ours_logits[-1].argmax()), int(theirs_logits[-1].argmax()))


def format_report(report: Report, tokenizer) -> str:
    """The table, the next-token verdict and where (if anywhere) the difference becomes too large."""
    width = max(len(row.name) for row in report.rows)
    lines = [f"{'':{width}}  {'max|diff|':>10}  {'mean|diff|':>10}  {'relative':>10}"]
    bad = report.first_bad
    for row in report.rows:
        mark = "  <- first beyond tolerance" if row is bad else ""
        lines.append(f"{row.name:{width}}  {row.max_abs:10.3e}  {row.mean_abs:10.3e}  {row.relative:10.3e}{mark}")
    ours, theirs = (f"{t} {tokenizer.id_to_piece(t)!r}" for t in (report.ours_next, report.theirs_next))
    agree = "agree" if report.ours_next == report.theirs_next else "DIFFER"
    lines.append(f"next token (argmax): ours {ours}, transformers {theirs}: {agree}")
    limit = f"tolerance for {report.encoding} {report.tolerance:.0e} (relative: of what the row adds)"
    if bad is None:
        lines.append(f"all rows within the {limit}")
    else:
        lines.append(f"first row beyond the {limit}: {bad.name}; the conversion goes wrong there")
    return "\n".join(lines)


def run_compare(model: Path, lora: Path | None, tokenizer: Path | None, prompt: str, hf_model: Path | None,
                hf_lora: Path | None, tolerance: float | None = None) -> str:
    """`lora-run --compare`: the report for one prompt, as printed."""
    if hf_model is None:
        raise ConversionError("--compare needs --hf-model DIR: the Hugging Face checkpoint the file was converted from")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
        raise ConversionError(f"--tolerance {tolerance}: expected a finite number > 0")
    if (lora is None) != (hf_lora is None):
        raise ConversionError("--compare compares like with like: give both --lora and --hf-lora, or neither")
    loaded = load(model, lora, tokenizer)
    ids = prompt_ids(loaded, prompt)
    encoding = encoding_of(model)
    if tolerance is None:
        tolerance = tolerance_for(encoding, lora is not None)
    label = f"{encoding} + fp16 LoRA" if lora is not None else encoding
    report = compare(loaded, load_transformers(hf_model, hf_lora), ids, label, tolerance)
    return f"{model} vs transformers {hf_model} on {len(ids)} tokens\n" + format_report(report, loaded.tokenizer)
