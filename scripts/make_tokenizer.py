"""Train a small Gemma-style SentencePiece tokenizer on generated text.

Special ids follow Gemma: <pad>=0, <eos>=1, <bos>=2, <unk>=3, plus the chat-turn
markers as user-defined pieces. Training is deterministic for a given corpus.

    python scripts/make_tokenizer.py --out fixtures/tiny-gemma/tokenizer.model --vocab-size 512
    python scripts/make_tokenizer.py --out /tmp/gemma-2b/tokenizer.model --pad-to 256000  # a real-shape model's

`--pad-to` appends never-produced pieces up to a real vocabulary's size (a corpus this small
cannot train one), as the converter requires as many pieces as embedding rows.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import click
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb

WORDS = (
    "the a model runs on phones and browsers with small adapters that change what it says "
    "one two three four five six seven eight nine ten red green blue yellow cat dog bird fish "
    "answer question hello world river mountain city light dark fast slow up down left right "
    "alpha beta gamma delta apple banana cherry lemon orange paper stone water fire wind"
).split()
USER_DEFINED = ["<start_of_turn>", "<end_of_turn>"]


def corpus(lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(lines)]


def train(out: Path, vocab_size: int, seed: int = 0, pad_to: int = 0) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(4000, seed)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=USER_DEFINED,
        byte_fallback=True,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    out.write_bytes(padded(model.getvalue(), pad_to) if pad_to else model.getvalue())


def padded(model: bytes, pieces: int) -> bytes:
    """The model with never-produced pieces appended up to `pieces`."""
    proto = spm_pb.ModelProto.FromString(model)
    for index in range(len(proto.pieces), pieces):
        proto.pieces.add(piece=f"<unused_{index}>", score=-1e9, type=spm_pb.ModelProto.SentencePiece.NORMAL)
    return proto.SerializeToString()


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--vocab-size", default=512, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--pad-to", default=0, show_default=True, help="Pad to this many pieces (0: no padding).")
def main(out: Path, vocab_size: int, seed: int, pad_to: int) -> None:
    train(out, vocab_size, seed, pad_to)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
