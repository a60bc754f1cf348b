"""Full-file parity with MediaPipe 0.10.21 at real shapes: run both converters, diff tensor by tensor.

    python scripts/parity.py --workdir /tmp/parity                      # GEMMA_2B int8 + rank-8 LoRA
    python scripts/parity.py --workdir /tmp/parity --quantization int4  # int4, no LoRA
    python scripts/parity.py --workdir /tmp/parity --record fixtures/oracle/gemma-2b-int8.json

Ours runs with --mediapipe-compat (0.10.21's o_proj LoRA encoding and raw LoRA scaling).
`--record` stores MediaPipe's per-tensor digests, which tests/test_oracle.py checks our
per-tensor output against without rerunning the 2-minute, 9 GiB MediaPipe conversion.
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle import ROOT, ensure_checkpoint, gib, oracle_python, run_measured  # noqa: E402

sys.path.insert(0, str(ROOT))
from converter.tflite import WeightFile  # noqa: E402
from make_checkpoint import PYTORCH_PRESETS  # noqa: E402


def digests(path: Path) -> dict:
    """Per-tensor sha256 plus layout facts of a weights file."""
    weights = WeightFile(path)
    data = path.read_bytes() if path.stat().st_size < 2**26 else None
    with open(path, "rb") as handle:
        header = handle.read(weights.data_start)
    return {
        "file_size": path.stat().st_size,
        "flatbuffer_sha256": hashlib.sha256(header).hexdigest(),
        "file_sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
        "tensors": {
            name: {"type": e.type, "offset": e.offset, "size": e.nbytes,
                   "sha256": hashlib.sha256(weights.raw(name)).hexdigest()}
            for name, e in weights.tensors.items()
        },
    }


def compare(label: str, ours: Path, theirs: Path) -> bool:
    a, b = digests(ours), digests(theirs)
    names_a, names_b = list(a["tensors"]), list(b["tensors"])
    same_order = names_a == names_b
    differing = [n for n in names_b if n in a["tensors"] and a["tensors"][n] != b["tensors"][n]]
    missing = [n for n in names_b if n not in a["tensors"]]
    extra = [n for n in names_a if n not in b["tensors"]]
    identical = _same_bytes(ours, theirs)
    click.echo(f"{label}: {len(names_b)} tensors in MediaPipe's file; same order: {same_order}; "
               f"differing: {len(differing)}; missing: {len(missing)}; extra: {len(extra)}; "
               f"flatbuffer region identical: {a['flatbuffer_sha256'] == b['flatbuffer_sha256']}; "
               f"whole file identical: {identical}")
    for name in (differing + missing + extra)[:10]:
        click.echo(f"  {name}: ours {a['tensors'].get(name)} theirs {b['tensors'].get(name)}")
    return identical


def _same_bytes(a: Path, b: Path, block: int = 1 << 24) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(block), fb.read(block)
            if x != y:
                return False
            if not x:
                return True


# Phi-2, Falcon-RW, StableLM: Falcon's checkpoint is one PyTorch file; 0.10.21 leaves Phi-2's LoRA
# bins unrenamed, so its LoRA oracle renames them as PhiMapper intends before the C++ step.
RENAMED_LORA_PRESETS = ("PHI_2",)


def checkpoint_input(preset: str, folder: Path) -> tuple[str, Path]:
    """The --ckpt-format and --input-ckpt both converters get (MediaPipe reads one PyTorch file)."""
    if preset in PYTORCH_PRESETS:
        return "pytorch", folder / "pytorch_model.bin"
    return "safetensors", folder


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(tempfile.gettempdir()) / "lora-convert-parity", show_default=True)
@click.option("--preset", default="GEMMA_2B", show_default=True)
@click.option("--quantization", type=click.Choice(["int8", "int4"]), default="int8", show_default=True)
@click.option("--lora-rank", default=8, show_default=True, help="0: no LoRA.")
@click.option("--record", type=click.Path(path_type=Path), default=None, help="Write MediaPipe's digests here.")
def main(workdir: Path, preset: str, quantization: str, lora_rank: int, record: Path | None) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint, adapter, tokenizer = ensure_checkpoint(preset, workdir / preset.lower(), lora_rank or None)
    bits = {"int8": 8, "int4": 4}[quantization]
    theirs = workdir / f"{preset.lower()}-mediapipe-{quantization}"  # per preset: one workdir serves all
    ours = workdir / f"{preset.lower()}-ours-{quantization}"
    ckpt_format, checkpoint = checkpoint_input(preset, checkpoint)
    mp_command = [oracle_python(), str(ROOT / "scripts" / "oracle_convert.py"), "--model-type", preset,
                  "--input-ckpt", str(checkpoint), "--ckpt-format", ckpt_format, "--vocab-model-file", str(tokenizer),
                  "--bits", str(bits), "--output-dir", str(theirs / "bins"), "--output-tflite-file",
                  str(theirs / "model.bin")]
    our_command = [sys.executable, "-m", "converter.cli", "--model-type", preset, "--input-ckpt", str(checkpoint),
                   "--ckpt-format", ckpt_format, "--vocab-model-file", str(tokenizer), "--quantization", quantization,
                   "--output-dir", str(ours), "--output-tflite-file", str(ours / "model.bin"), "--mediapipe-compat",
                   "--quiet"]
    if adapter:
        mp_command += ["--lora-ckpt", str(adapter), "--lora-rank", str(lora_rank),
                       "--lora-output-tflite-file", str(theirs / "lora.bin")]
        our_command += ["--lora-ckpt", str(adapter), "--lora-rank", str(lora_rank),
                        "--lora-output-tflite-file", str(ours / "lora.bin")]
        if preset in RENAMED_LORA_PRESETS:
            mp_command += ["--rename-lora-bins"]
    if not (theirs / "model.bin").is_file():
        run = run_measured(mp_command, cwd=workdir)
        click.echo(f"MediaPipe 0.10.21: {run.seconds:.1f} s, peak RSS {gib(run.peak_rss_bytes)}, exit {run.returncode}")
        if run.returncode:
            raise SystemExit("MediaPipe's converter failed")
    run = run_measured(our_command, cwd=ROOT)
    click.echo(f"ours: {run.seconds:.1f} s, peak RSS {gib(run.peak_rss_bytes)}, exit {run.returncode}")
    if run.returncode:
        raise SystemExit("our converter failed")
    ok = compare(f"base {quantization}", ours / "model.bin", theirs / "model.bin")
    if adapter:
        ok &= compare("LoRA", ours / "lora.bin", theirs / "lora.bin")
    if record:
        record.parent.mkdir(parents=True, exist_ok=True)
        recorded = {"preset": preset, "quantization": quantization, "lora_rank": lora_rank or None,
                    "base": digests(theirs / "model.bin")}
        if adapter:
            recorded["lora"] = digests(theirs / "lora.bin")
        record.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        click.echo(f"recorded MediaPipe's digests in {record}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
