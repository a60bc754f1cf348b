"""`lora-run` (`--runtime web` included) on hostile input: one line naming the culprit,
exit 1 (2 for click's usage errors), no traceback, no hang, and correct input still works."""
from __future__ import annotations

import io
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bundler.task import METADATA_ENTRY, MODEL_ENTRY, TOKENIZER_ENTRY, bundle_metadata, write_zip
from converter import ConversionConfig, convert
from converter.errors import ConversionError
from converter.proto import llm_params_pb2
from converter.tflite import LLM_PARAMETERS, LORA_RANK, SPM_VOCAB_MODEL, TensorSpec, WeightFile, WeightFileWriter
from harness import generate as generation
from harness.cli import main
from harness.generate import LoadedModel, Options, check_context, check_memory, generate, load
from harness.inputs import tolerant_stdout
from harness.memory import generation_bytes

from .conftest import TINY, TINY_LORA, TOKENIZER

PROMPT = "one two three"
LAYER_1 = "params.lm.transformer.x_layers_1."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny Gemma and its adapter converted (fp32 base, fp16 LoRA halves, rank 8)."""
    out = tmp_path_factory.mktemp("hostile-run")
    result = convert(ConversionConfig(
        input_ckpt=TINY, ckpt_format="safetensors", model_type="GEMMA_2B", output_dir=out, vocab_model_file=TOKENIZER,
        quantization="fp32", lora_ckpt=TINY_LORA, lora_rank=8))
    return result.output, result.lora_output


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(result, message: str, code: int = 1) -> None:
    """Exit `code`, and stderr is one line starting with `message` (no traceback)."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.output


def rewrite(source: Path, target: Path, parameters=None, drop=(), sizes=None, subgraph=None, metadata=None) -> Path:
    """A copy of a weights file with other LlmParameters, without some tensors, with tensors of
    other sizes (their bytes repeated or cut), another model type or replaced metadata values."""
    weights = WeightFile(source)
    values = dict(weights.metadata)
    if parameters is not None:
        values[LLM_PARAMETERS] = parameters.SerializeToString()
    values.update(metadata or {})
    sizes = sizes or {}
    specs = [TensorSpec(e.name, e.type, sizes.get(e.name, e.nbytes)) for e in weights.tensors.values() if e.name not in drop]
    with WeightFileWriter(target, subgraph or weights.subgraph_name, specs, list(values.items())) as writer:
        for spec in specs:
            writer.write(spec.name, np.resize(np.array(weights.raw(spec.name)), spec.nbytes))
    return target


def parameters_of(path: Path, **changes) -> llm_params_pb2.LlmParameters:
    params = WeightFile(path).parameters
    for name, value in changes.items():
        if name == "vocab_size":
            params.vocab_size = value
        else:
            setattr(params.transformer_parameters, name, value)
    return params


def window_of(path: Path, window: int) -> llm_params_pb2.LlmParameters:
    params = WeightFile(path).parameters
    params.transformer_parameters.self_attention_parameters.sliding_window_size = window
    return params


@contextmanager
def no_hang(seconds: int = 30):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_correct_files_generate(files):
    base, lora = files
    result = run("--model", base, "--lora", lora, "--prompt", PROMPT, "--max-tokens", 10, "--temperature", 0)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() and "tokens/s" in result.stderr


@pytest.mark.parametrize("option, value, message", [
    ("--top-k", 0, "--top-k 0: expected an integer from 1"),
    ("--top-k", -3, "--top-k -3: expected an integer from 1"),
    ("--temperature", "nan", "--temperature nan: expected a finite number >= 0"),
    ("--temperature", "inf", "--temperature inf: expected a finite number >= 0"),
    ("--temperature", -1, "--temperature -1.0: expected a finite number >= 0"),
    ("--random-seed", 2**40, f"--random-seed {2**40}: expected a 32-bit integer"),
    ("--random-seed", -2**40, f"--random-seed {-2**40}: expected a 32-bit integer"),
    ("--max-tokens", 0, "--max-tokens 0: expected an integer from 1"),
    ("--max-tokens", -5, "--max-tokens -5: expected an integer from 1"),
])
def test_bad_options_are_refused_before_anything_is_loaded(tmp_path, option, value, message):
    # The model does not exist: the option's error comes first, so nothing was opened.
    refused(run("--model", tmp_path / "absent.bin", "--prompt", PROMPT, option, value), f"error: {message}")


@pytest.mark.parametrize("option, value", [("--top-k", "abc"), ("--max-tokens", "1.5"), ("--temperature", "warm"),
                                           ("--random-seed", "0x")])
def test_click_type_errors_stay_usage_errors(files, option, value):
    result = run("--model", files[0], "--prompt", PROMPT, option, value)
    assert result.exit_code == 2 and "Invalid value for" in result.stderr and "Traceback" not in result.output


def test_max_tokens_beyond_the_context_is_refused_before_loading(files, monkeypatch):
    monkeypatch.setattr(generation, "ReferenceModel", lambda *_: pytest.fail("weights were loaded"))
    refused(run("--model", files[0], "--prompt", PROMPT, "--max-tokens", 10**9),
            "error: --max-tokens 1000000000: more than the model's context of 8192 tokens (prompt + output); "
            "use at most --max-tokens 8192")
    check_context(Options(max_tokens=8192), 8192)  # the context itself is fine
    check_context(Options(max_tokens=10**9), 0)  # an unknown context bounds nothing


def test_max_tokens_that_do_not_fit_in_memory_are_refused_with_what_fits(files, monkeypatch):
    loaded = load(files[0])
    dims, prompt_tokens = loaded.model.dims, 4
    free = generation_bytes(dims, 100, prompt_tokens)
    monkeypatch.setattr(generation, "available_bytes", lambda: free)
    check_memory(dims, Options(max_tokens=100), prompt_tokens)
    with pytest.raises(ConversionError, match=r"^--max-tokens 101: the KV cache and attention for a 4-token prompt "
                                              r"need about .* MiB, only .* MiB of memory is free; "
                                              r"use at most --max-tokens 100$"):
        check_memory(dims, Options(max_tokens=101), prompt_tokens)
    monkeypatch.setattr(generation, "available_bytes", lambda: 1)
    refused(run("--model", files[0], "--prompt", PROMPT, "--max-tokens", 8000),
            "error: --max-tokens 8000: the KV cache and attention for a 4-token prompt need about")
    assert "the prompt alone does not fit" in run("--model", files[0], "--prompt", PROMPT).stderr


def test_a_prompt_longer_than_max_tokens_is_one_line(files):
    refused(run("--model", files[0], "--prompt", PROMPT, "--max-tokens", 4),
            "error: the prompt takes 4 tokens (start token included); --max-tokens 4 leaves no room for output: "
            "raise it (the model's context: 8192) or shorten the prompt")


def test_invalid_utf8_prompt_is_refused_by_position(files):
    prompt = os.fsdecode(b"ab\xffcd")  # what Python makes of such bytes on the command line
    refused(run("--model", files[0], "--prompt", prompt), "error: --prompt is not valid UTF-8 text (byte 0xff at character 2)")
    refused(run("--model", files[0], "--prompt", "x\ud800"), "error: --prompt is not valid UTF-8 text (lone surrogate U+D800")


def test_any_text_prints_on_an_ascii_stdout(monkeypatch):
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    tolerant_stdout()
    sys.stdout.write("h\u00e9 \ufffd")
    sys.stdout.flush()
    assert raw.getvalue() == b"h\\xe9 \\ufffd"


def test_characters_split_over_byte_tokens_are_streamed_and_rows_without_pieces_print_nothing(files, monkeypatch):
    loaded = load(files[0])
    piece = loaded.tokenizer.piece_to_id
    first, second = piece("<0xC3>"), piece("<0xA9>")  # "é" in UTF-8, one byte token each
    beyond = loaded.tokenizer.get_piece_size()  # an embedding row no piece names
    tokens = [piece("▁one"), first, second, beyond, first]  # ends in half a character
    monkeypatch.setattr(generation, "generate_ids", lambda *_: iter(tokens))
    pieces: list[str] = []
    result = generate(LoadedModel(loaded.model, loaded.tokenizer, loaded.start_id, set()), PROMPT, Options(),
                      on_text=pieces.append)
    assert "".join(pieces) == result.text == "one\u00e9\ufffd"


def test_file_mixups_are_one_line(files, tmp_path):
    base, lora = files
    text, noise = tmp_path / "notes.txt", tmp_path / "noise.bin"
    text.write_text("not a model\n")
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    no_weights = tmp_path / "no-weights.task"
    write_zip(no_weights, [("TF_LITE_EMBEDDER_MODEL", base), (TOKENIZER_ENTRY, TOKENIZER.read_bytes()),
                           (METADATA_ENTRY, bundle_metadata("<bos>", ["<eos>"], False, None, None, None))])
    cases = [
        (["--model", lora], f"error: --model {lora} is a LoRA weights file: give it as --lora"),
        (["--model", base, "--lora", base], f"error: --lora {base}: a base model's weights file, not a LoRA"),
        (["--model", text], f"error: {text}: not a TFLite weights file"),
        (["--model", noise], f"error: {noise}: not a TFLite weights file"),
        (["--model", no_weights], f"error: {no_weights}: bundle lacks entry {MODEL_ENTRY}"),
        (["--model", tmp_path], f"error: --model {tmp_path} is a folder; expected a regular file"),
        (["--model", tmp_path / "absent.bin"], f"error: --model {tmp_path / 'absent.bin'}: file not found"),
        (["--model", base, "--lora", tmp_path / "absent.bin"], f"error: --lora {tmp_path / 'absent.bin'}: file not found"),
        (["--model", base, "--lora", text], f"error: {text}: not a TFLite weights file"),
    ]
    for args, message in cases:
        refused(run(*args, "--prompt", PROMPT), message)


def test_fifos_and_devices_are_refused_without_hanging(files, tmp_path):
    base, lora = files
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with no_hang():
        for args, option in ((["--model", fifo], "--model"), (["--model", base, "--lora", fifo], "--lora"),
                             (["--model", "/dev/zero"], "--model")):
            refused(run(*args, "--prompt", PROMPT), f"error: {option} {args[-1]} is a ")
            assert "expected a regular file" in run(*args, "--prompt", PROMPT).stderr
        refused(run("--model", base, "--tokenizer", fifo, "--prompt", PROMPT),
                f"error: --tokenizer {fifo} is a FIFO (named pipe); expected a regular file")


def test_an_adapter_for_another_model_is_one_line(files, tmp_path):
    base, lora = files
    cases = [
        (rewrite(lora, tmp_path / "deeper.bin", parameters_of(lora, num_stacks=3)),
         "was converted for another model (num_layers 3 vs 2)"),
        (rewrite(lora, tmp_path / "gemma2.bin", subgraph="GEMMA2_2B"),
         "was converted for model type GEMMA2_2B, the model is GEMMA_2B"),
        (rewrite(lora, tmp_path / "lying-rank.bin", metadata={LORA_RANK: 4}),
         f"tensor {LAYER_1.replace('1', '0')}self_attention.q.w_prime_left has 1024 bytes, expected a [4, 64] fp16 "
         "matrix (rank 4 in its metadata)"),
        (rewrite(lora, tmp_path / "rank-0.bin", metadata={LORA_RANK: 0}), "LoRA rank 0 in its metadata"),
        (rewrite(lora, tmp_path / "half.bin", drop=[f"{LAYER_1}self_attention.v.w_prime_right"]),
         f"tensor {LAYER_1}self_attention.v.w_prime_right is missing"),
    ]
    for path, message in cases:
        refused(run("--model", base, "--lora", path, "--prompt", PROMPT), f"error: --lora {path}")
        assert message in run("--model", base, "--lora", path, "--prompt", PROMPT).stderr


def test_parameters_that_disagree_with_the_tensors_name_the_culprit(files, tmp_path):
    base, _ = files
    norm = f"{LAYER_1}pre_layer_norm.scale"
    cases = [
        (rewrite(base, tmp_path / "more-layers.bin", parameters_of(base, num_stacks=5)),
         "no tensor params.lm.transformer.x_layers_2.pre_layer_norm.scale (its parameters need it"),
        (rewrite(base, tmp_path / "no-heads.bin", parameters_of(base, num_heads=0)),
         "LlmParameters num_heads is 0, expected at least 1"),
        (rewrite(base, tmp_path / "kv.bin", parameters_of(base, num_kv_heads=3)),
         "LlmParameters num_kv_heads 3 does not divide num_heads 4"),
        (rewrite(base, tmp_path / "wider.bin", parameters_of(base, embedding_dim=128)),
         "tensor params.lm.softmax.logits_ffn.w has 131072 bytes of type 0, not a float [512, 128] matrix"),
        (rewrite(base, tmp_path / "window.bin", window_of(base, -4)),
         "LlmParameters self_attention_parameters.sliding_window_size is -4, expected a finite number >= 0"),
        (rewrite(base, tmp_path / "cap.bin", parameters_of(base, query_rescale_factor=float("nan"))),
         "LlmParameters query_rescale_factor is nan, expected a finite number > 0"),
        (rewrite(base, tmp_path / "short-norm.bin", sizes={norm: 128}),
         f"tensor {norm} has 128 bytes, not 64 float32 values"),
        (rewrite(base, tmp_path / "no-norm.bin", drop=[norm]), f"no tensor {norm}"),
    ]
    for path, message in cases:
        result = run("--model", path, "--prompt", PROMPT)
        refused(result, f"error: {path}")
        assert message in result.stderr, result.stderr


def test_corrupt_or_foreign_tokenizers_are_one_line(files, tmp_path):
    base, _ = files
    garbage = b"\x0a\xff\xff\xff\xff\x0f garbage"
    embedded = rewrite(base, tmp_path / "bad-tokenizer.bin", metadata={SPM_VOCAB_MODEL: garbage})
    task = tmp_path / "bad-tokenizer.task"
    write_zip(task, [(MODEL_ENTRY, base), (TOKENIZER_ENTRY, garbage),
                     (METADATA_ENTRY, bundle_metadata("<bos>", ["<eos>"], False, None, None, None))])
    small = rewrite(base, tmp_path / "small-vocab.bin", parameters_of(base, vocab_size=256))
    text = tmp_path / "tokenizer.txt"
    text.write_text("hello")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    cases = [
        (["--model", embedded], f"error: {embedded}: metadata {SPM_VOCAB_MODEL}: not a valid SentencePiece model"),
        (["--model", task], f"error: {task}: entry {TOKENIZER_ENTRY}: not a valid SentencePiece model"),
        (["--model", base, "--tokenizer", text], f"error: --tokenizer {text}: not a valid SentencePiece model"),
        (["--model", base, "--tokenizer", empty], f"error: --tokenizer {empty}"),
        (["--model", small], f"error: the tokenizer has 512 pieces but {small} has a vocabulary of 256 embedding rows"),
    ]
    for args, message in cases:
        refused(run(*args, "--prompt", PROMPT), message)


def test_compare_arguments_and_foreign_checkpoints_are_one_line(files, tmp_path):
    from transformers import GemmaConfig, GemmaForCausalLM

    base, lora = files
    for tolerance in ("nan", "0", "-1", "inf"):
        refused(run("--model", base, "--prompt", PROMPT, "--compare", "--hf-model", TINY, "--tolerance", tolerance),
                f"error: --tolerance {float(tolerance)}: expected a finite number > 0")
    inconsistent = tmp_path / "inconsistent"
    inconsistent.mkdir()
    for name in ("model.safetensors", "tokenizer.model"):
        (inconsistent / name).symlink_to(TINY / name)
    (inconsistent / "config.json").write_text((TINY / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 32'))
    narrow = tmp_path / "narrow"
    config = GemmaConfig.from_pretrained(TINY)
    config.hidden_size = 32
    GemmaForCausalLM(config).save_pretrained(narrow)
    bad_adapter = tmp_path / "bad-adapter"
    bad_adapter.mkdir()
    (bad_adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": "x"}')
    cases = [
        (["--hf-model", inconsistent], f"error: --hf-model {inconsistent}: transformers cannot load it "
                                       "(its weights do not have the shapes its config.json gives)"),
        (["--hf-model", narrow], "error: transformers' hidden states have shape [4, 32], the weights file's [4, 64]: "
                                 "not the same model"),
        (["--lora", lora, "--hf-model", TINY, "--hf-lora", bad_adapter], f"error: --hf-lora {bad_adapter}: PEFT cannot load it"),
    ]
    for args, message in cases:
        refused(run("--model", base, "--prompt", PROMPT, "--compare", *args), message)


def test_runtime_web_refuses_bad_arguments_before_starting_a_browser(files, tmp_path, monkeypatch):
    from harness import web_runtime

    monkeypatch.setattr(web_runtime, "WebRuntime", lambda *_, **__: pytest.fail("a browser was started"))
    monkeypatch.setattr(web_runtime, "missing", lambda *_: None)  # as if Chromium and the package were there
    base, lora = files
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = [
        (["--model", base, "--top-k", 0], "error: --top-k 0: expected an integer from 1"),
        (["--model", base, "--temperature", "nan"], "error: --temperature nan"),
        (["--model", base, "--max-tokens", -1], "error: --max-tokens -1"),
        (["--model", lora], f"error: --model {lora} is a LoRA weights file"),
        (["--model", base, "--lora", base], f"error: --lora {base}: a base model's weights file"),
        (["--model", fifo], f"error: --model {fifo} is a FIFO (named pipe); expected a regular file"),
        (["--model", tmp_path / "absent.bin"], f"error: --model {tmp_path / 'absent.bin'}: file not found"),
    ]
    with no_hang():
        for args, message in cases:
            refused(run("--runtime", "web", *args, "--prompt", PROMPT), message)
        refused(run("--runtime", "web", "--model", base, "--prompt", os.fsdecode(b"\xfe")),
                "error: --prompt is not valid UTF-8 text (byte 0xfe at character 0)")
