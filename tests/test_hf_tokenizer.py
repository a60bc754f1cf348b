"""Hugging Face BPE tokenizer folders as --vocab-model-file / --tokenizer-model.

MediaPipe 0.10.21 converts such a folder with its C++ `ConvertHfTokenizer`; ours must write the
same SentencePiece bytes (live oracle, several tokenizer shapes), and a folder must work through
`lora-convert`, `lora-bundle` and `lora-run`.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb

from converter.errors import ConversionError
from converter.hf_tokenizer import convert_hf_tokenizer, is_converted_hf_tokenizer
from converter.tflite import SPM_VOCAB_MODEL, WeightFile

from .conftest import ROOT, run_convert
from .test_oracle import oracle_python

OPTION = "--vocab-model-file"
TEXT = ["Hello world, the quick brown fox jumps over the lazy dog.", "The lazy dog sleeps; hello again world!",
        "def main():\n    return 42  # tabs\tand  spaces", "Ünïcödé — ok"]


def added(content: str, special: bool, normalized: bool) -> dict:
    return {"content": content, "special": special, "normalized": normalized}


def trained_tokenizer(folder: Path, vocab_size: int, specials: list[str], extra: list[dict], unk: str,
                      shuffle_vocab: bool = False) -> Path:
    """A byte-level BPE trained on TEXT (specials first in the vocabulary, as GPT-2-style
    tokenizers have them), extra added tokens after training, and a tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXT * 4, trainer)
    for token in extra:
        tokenizer.add_tokens([AddedToken(token["content"], special=token["special"],
                                         normalized=token["normalized"])])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    if shuffle_vocab:  # ids, not the file's order, decide the piece order
        data = json.loads((folder / "tokenizer.json").read_text())
        data["model"]["vocab"] = dict(reversed(list(data["model"]["vocab"].items())))
        (folder / "tokenizer.json").write_text(json.dumps(data))
    config = {"add_prefix_space": False, "bos_token": specials[0], "eos_token": specials[0], "unk_token": unk,
              "tokenizer_class": "GPT2Tokenizer", "model_max_length": 2048}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# Shaped like the real ones: Phi-2 (CodeGen: <|endoftext|> first, whitespace runs added as
# normalized tokens), Falcon-RW (GPT-2: <|endoftext|> the only special), StableLM (GPT-NeoX:
# <|endoftext|>, <|padding|>; special added tokens outside the vocabulary, mixed flags).
TOKENIZERS = {
    "phi-2": dict(vocab_size=320, specials=["<|endoftext|>"], unk="<|endoftext|>",
                  extra=[added(" " * n, False, True) for n in (4, 3, 2)]),
    "falcon-rw": dict(vocab_size=300, specials=["<|endoftext|>"], unk="<|endoftext|>", extra=[]),
    "stablelm": dict(vocab_size=340, specials=["<|endoftext|>", "<|padding|>"], unk="<|padding|>",
                     extra=[added("<|im_start|>", True, False), added("<|im_end|>", True, True),
                            added("  ", False, True), added("foo bar", False, False)], shuffle_vocab=True),
}


def handmade_tokenizer(folder: Path) -> Path:
    """A fully deterministic tokenizer (explicit vocabulary and merges, no training)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(alphabet))}}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "o"), ("Ġ", "lo")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tokenizer.add_tokens([AddedToken("   ", normalized=True), AddedToken("<|special|>", special=True, normalized=False)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"unk_token": "<|endoftext|>"}))
    return folder


# sha256 of the SentencePiece bytes MediaPipe 0.10.21's ConvertHfTokenizer writes for
# handmade_tokenizer (recorded from the oracle venv by the oracle test below).
HANDMADE_ORACLE_SHA256 = "6e0091a23c4ef30ad7ef1e71e32794859e7dcf44592a9cb636a8730d3e82e398"


def oracle_convert(folder: Path, out: Path) -> bytes:
    """MediaPipe 0.10.21's own conversion of the folder."""
    script = ("import sys; from mediapipe.python._framework_bindings import model_ckpt_util; "
              "model_ckpt_util.ConvertHfTokenizer(sys.argv[1], sys.argv[2])")
    subprocess.run([oracle_python(), "-c", script, str(folder), str(out)], check=True, capture_output=True)
    return out.read_bytes()


@pytest.mark.oracle
@pytest.mark.parametrize("name", TOKENIZERS)
def test_trained_tokenizers_match_mediapipes_bytes(tmp_path, name):
    folder = trained_tokenizer(tmp_path / name, **TOKENIZERS[name])
    assert convert_hf_tokenizer(folder, OPTION) == oracle_convert(folder, tmp_path / "oracle.model")


@pytest.mark.oracle
def test_handmade_tokenizer_matches_mediapipes_recorded_bytes(tmp_path):
    folder = handmade_tokenizer(tmp_path / "handmade")
    expected = oracle_convert(folder, tmp_path / "oracle.model")
    assert hashlib.sha256(expected).hexdigest() == HANDMADE_ORACLE_SHA256
    assert convert_hf_tokenizer(folder, OPTION) == expected


def test_handmade_tokenizer_digest_without_the_oracle(tmp_path):
    data = convert_hf_tokenizer(handmade_tokenizer(tmp_path / "handmade"), OPTION)
    assert hashlib.sha256(data).hexdigest() == HANDMADE_ORACLE_SHA256


def test_pieces_follow_the_hugging_face_ids(tmp_path):
    """Independent of our code: the tokenizers library's own ids and tokens for the same folder."""
    from tokenizers import Tokenizer

    folder = trained_tokenizer(tmp_path / "stablelm", **TOKENIZERS["stablelm"])
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = spm_pb.ModelProto.FromString(convert_hf_tokenizer(folder, OPTION))
    base = hf.get_vocab_size(with_added_tokens=False)
    assert [p.piece for p in model.pieces[:base]] == [hf.id_to_token(i) for i in range(base)]
    assert [p.piece for p in model.pieces[base:]] == ["<|im_end|>", "  "]  # normalized added tokens, file order
    types = {p.piece: spm_pb.ModelProto.SentencePiece.Type.Name(p.type) for p in model.pieces}
    assert types["<|padding|>"] == "UNKNOWN" and types["<|endoftext|>"] == "NORMAL" and types["  "] == "USER_DEFINED"
    assert model.trainer_spec.model_type == spm_pb.TrainerSpec.BPE and not model.normalizer_spec.escape_whitespaces
    processor = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    assert processor.piece_to_id("<|endoftext|>") == hf.token_to_id("<|endoftext|>")
    byte_level = "".join(c if c != " " else "Ġ" for c in "the lazy dog")
    assert processor.encode(byte_level) == hf.encode("the lazy dog").ids


BAD_FOLDERS = {
    "no tokenizer.json": (lambda f: (f / "tokenizer.json").unlink(), ["tokenizer.json", "Hugging Face"]),
    "no tokenizer_config.json": (lambda f: (f / "tokenizer_config.json").unlink(), ["tokenizer_config.json"]),
    "broken JSON": (lambda f: (f / "tokenizer.json").write_text('{"model": '), ["tokenizer.json", "not valid JSON"]),
    "not an object": (lambda f: (f / "tokenizer.json").write_text("[1]"), ["tokenizer.json", "JSON object"]),
    "WordPiece": (lambda f: edit(f, lambda t: t["model"].update(type="WordPiece")), ["WordPiece", "BPE"]),
    "vocabulary gap": (lambda f: edit(f, lambda t: t["model"]["vocab"].update({"Ġthe": 999})), ["0..", "999"]),
    "no unk_token": (lambda f: (f / "tokenizer_config.json").write_text("{}"), ["unk_token", "nothing"]),
    "unk_token object": (lambda f: (f / "tokenizer_config.json").write_text('{"unk_token": {"content": "x"}}'),
                         ["unk_token", "string"]),
    "added token twice": (lambda f: edit(f, lambda t: t["added_tokens"].append(
        {"id": 5, "content": "!", "normalized": True, "special": False})), ["'!'", "already a piece"]),
}


def edit(folder: Path, change) -> None:
    data = json.loads((folder / "tokenizer.json").read_text())
    change(data)
    (folder / "tokenizer.json").write_text(json.dumps(data))


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_folder_is_one_clear_error(tmp_path, case):
    folder = handmade_tokenizer(tmp_path / "tok")
    damage, words = BAD_FOLDERS[case]
    damage(folder)
    with pytest.raises(ConversionError) as caught:
        convert_hf_tokenizer(folder, OPTION)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(OPTION)
    for word in words:
        assert word in message, (word, message)


def test_phi2_converts_bundles_and_runs_with_a_tokenizer_folder(tmp_path):
    """lora-convert embeds the folder's SentencePiece bytes; lora-bundle (.task) and lora-run take
    the folder too; Phi-2's stop token "<|endoftext|>" resolves to the Hugging Face id."""
    from tokenizers import Tokenizer

    from harness.generate import load, prompt_ids

    from .test_bundler import run_bundle
    from .test_families_other import hf_model, save

    folder = trained_tokenizer(tmp_path / "tok", **TOKENIZERS["phi-2"])
    expected = convert_hf_tokenizer(folder, OPTION)
    checkpoint = save(hf_model("PHI_2"), tmp_path / "ckpt", pytorch=False)
    out = tmp_path / "out"
    result = run_convert("--model-type", "PHI_2", "--input-ckpt", checkpoint, "--vocab-model-file", folder,
                         "--output-dir", out, "--output-tflite-file", out / "model.bin", "--quiet")
    assert result.exit_code == 0, result.output
    assert WeightFile(out / "model.bin").metadata[SPM_VOCAB_MODEL] == expected
    task = tmp_path / "phi.task"
    result = run_bundle("--tflite-model", out / "model.bin", "--tokenizer-model", folder, "--start-token",
                        "<|endoftext|>", "--stop-tokens", "<|endoftext|>", "--output-filename", task)
    assert result.exit_code == 0, result.output
    from bundler.task import TOKENIZER_ENTRY, TaskFile

    assert TaskFile(task).read(TOKENIZER_ENTRY) == expected
    eos = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("<|endoftext|>")
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for loaded in (load(out / "model.bin"), load(out / "model.bin", tokenizer_path=folder), load(task)):
        assert loaded.stop_ids == {eos} and loaded.byte_level
        assert prompt_ids(loaded, "Hello world, the lazy dog")[1:] == hf.encode("Hello world, the lazy dog").ids


def test_lora_run_writes_spaces_as_the_runtime_does_for_byte_level_vocabularies(tmp_path, monkeypatch):
    """Prompts: spaces become "Ġ" before SentencePiece sees them (the web runtime's observed
    behaviour, README "Other families in the web runtime"), which gives the Hugging Face ids;
    output: "Ġ" pieces come back as spaces, as the Hugging Face decoder gives them."""
    from tokenizers import Tokenizer

    from harness import generate as gen
    from harness.generate import LoadedModel, prompt_ids

    folder = trained_tokenizer(tmp_path / "tok", **TOKENIZERS["falcon-rw"])
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer = spm.SentencePieceProcessor(model_proto=convert_hf_tokenizer(folder, OPTION))
    loaded = LoadedModel(None, tokenizer, 0, set(), byte_level=True)
    text = "The quick brown fox jumps over the lazy dog"
    assert prompt_ids(loaded, text) == [0] + hf.encode(text).ids
    assert prompt_ids(LoadedModel(None, tokenizer, 0, set()), text) != [0] + hf.encode(text).ids
    answer = hf.encode(" hello again world").ids
    monkeypatch.setattr(gen, "generate_ids", lambda *args: iter(answer))
    assert gen.generate(loaded, "", None).text == hf.decode(answer) == " hello again world"


def test_folder_with_more_pieces_than_the_model_is_refused(tmp_path):
    from .test_families_other import hf_model, save

    folder = trained_tokenizer(tmp_path / "tok", **TOKENIZERS["phi-2"])
    checkpoint = save(hf_model("PHI_2", vocab_size=300), tmp_path / "ckpt", pytorch=False)
    out = tmp_path / "out"
    result = run_convert("--model-type", "PHI_2", "--input-ckpt", checkpoint, "--vocab-model-file", folder,
                         "--output-dir", out, "--output-tflite-file", out / "model.bin", "--quiet")
    assert result.exit_code == 1 and f"--vocab-model-file {folder} has 323 pieces" in result.stderr, result.output
    assert not (out / "model.bin").exists()


def test_litertlm_bundle_refuses_a_folder(tmp_path):
    from .test_bundler import run_bundle

    folder = handmade_tokenizer(tmp_path / "tok")
    result = run_bundle("--tflite-model", ROOT / "README.md", "--tokenizer-model", folder, "--start-token", "x",
                        "--stop-tokens", "x", "--output-filename", tmp_path / "m.litertlm", "--format", "litertlm")
    assert result.exit_code != 0


def test_only_hugging_face_conversions_count_as_such(tmp_path):
    assert is_converted_hf_tokenizer(convert_hf_tokenizer(handmade_tokenizer(tmp_path / "tok"), OPTION))
    assert not is_converted_hf_tokenizer((ROOT / "fixtures" / "tiny-gemma" / "tokenizer.model").read_bytes())
