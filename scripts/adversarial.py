"""Adversarial suite: hostile and unusual inputs for lora-convert, lora-bundle and lora-run.

Each case builds its inputs from the tiny fixtures in a folder of its own (`<work>/<case id>/in`,
outputs in `.../out`), runs one tool and checks what the README promises:

- `refuse`: exit 1 (2 for usage errors), stderr is one `error:` line (click's `Usage:` /
  `Error:` block for exit 2) after optional `warning:` / `note:` lines, no traceback, no new
  file and no `.partial` in the output folder, every input file's bytes and mtime unchanged;
- `accept`: exit 0, the outputs exist and read back (weights, bundles, manifests), inputs unchanged;
- `either`: one of the two, where the issue leaves the choice to the tool (still no traceback).

Every run has a timeout (a hang fails). Tools run in children forked from a server that has
imported them once (multiprocessing's forkserver): real processes, so FIFOs, signals, memory
blow-ups and crashes stay contained, at in-process speed.

    python scripts/adversarial.py --list
    python scripts/adversarial.py --run [--filter SUBSTRING] [--work DIR] [--keep]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
TOOLS = {"convert": ("converter.cli", "main"), "bundle": ("bundler.cli", "main"),
         "inspect": ("bundler.cli", "main"), "package": ("bundler.cli", "main"), "run": ("harness.cli", "main"),
         "eval": ("harness.cli", "main")}
SUBCOMMANDS = {"inspect": ["inspect"], "package": ["package"], "eval": ["eval"]}
TIMEOUT = 60.0
HANG_TIMEOUT = 20.0  # FIFOs, /dev/zero, absurd sizes: a refusal takes a second or two
MEMORY_LIMIT = 12 << 30  # address space of one run: an allocation bomb gets MemoryError, not the machine
MARKER = "PWNED"  # a file by this name appearing anywhere means injected code ran

# --------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    """One run of one tool on prepared inputs, and what must come out of it."""

    id: str  # tool.category.name
    argv: list[str]  # `{name}` placeholders are paths from Ctx (copied on first use)
    expect: str  # refuse | accept | either
    area: str  # who owns the behaviour: io ckpt config adapter bundle run pkg
    setup: Callable[[Ctx], None] | None = None
    outputs: tuple[str, ...] = ()  # accept: files that must exist and read back
    names: tuple[str, ...] = ()  # refuse: words the error line must contain (the culprit)
    warns: bool = False  # accept: a `warning:` line is required
    timeout: float = TIMEOUT
    during: Callable[[Ctx, multiprocessing.Process], str | None] | None = None  # signals, truncation
    parallel: int = 1  # concurrency: this many identical runs at once
    inputs_change: bool = False  # the case itself alters an input (SIGBUS truncation)
    check: Callable[[Ctx], str | None] | None = None  # extra check after the run; returns a problem
    needs_root: bool = False

    @property
    def tool(self) -> str:
        return self.id.split(".", 1)[0]

    @property
    def category(self) -> str:
        return self.id.split(".")[1]


class Ctx:
    """Paths of one case. Inputs are copied from the shared artifacts on first use, so a case
    may edit them freely; `{out}` is the (empty) output folder."""

    SOURCES: ClassVar[dict[str, str]] = {
        "ckpt": "tiny-gemma", "lora": "tiny-gemma-lora", "gemma2": "tiny-gemma2", "model": "model.bin",
        "adapter": "adapter.bin", "task": "model.task", "litertlm": "model.litertlm"}

    def __init__(self, root: Path, shared: Path):
        self.root, self.shared = root, shared
        self.input = root / "in"
        self.out = root / "out"
        self.input.mkdir(parents=True)
        self.out.mkdir()

    def __getitem__(self, key: str) -> str:
        return str(getattr(self, key))

    def __getattr__(self, key: str) -> Path:
        if key == "tok":
            return self.ckpt / "tokenizer.model"
        if key == "big":  # a 100 MB checkpoint, shared read-only (signal cases do not change it)
            return self.shared / "big-gemma"
        if key not in self.SOURCES:
            raise AttributeError(key)
        target = self.input / self.SOURCES[key]
        if not target.exists():
            source = self.shared / self.SOURCES[key]
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
        return target

    def path(self, template: str) -> str:
        return template.format_map(self)


# --------------------------------------------------------------------------------------------
# Input builders: small functions that damage or decorate a copy of an input


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def config(**changes) -> Callable[[Ctx], None]:
    return lambda c: edit_json(c.ckpt / "config.json", **changes)


def adapter_config(**changes) -> Callable[[Ctx], None]:
    return lambda c: edit_json(c.lora / "adapter_config.json", **changes)


def write_raw(where: str, name: str, data: bytes) -> Callable[[Ctx], None]:
    return lambda c: (getattr(c, where) / name).write_bytes(data)


def replace_file(where: str, data: bytes) -> Callable[[Ctx], None]:
    """Overwrite a file input (`model`, `adapter`, `task`, ...) with these bytes."""
    return lambda c: getattr(c, where).write_bytes(data)


def sparse(where: str, name: str, size: int) -> Callable[[Ctx], None]:
    """A file of `size` zero bytes that takes no disk space."""
    def make(c: Ctx) -> None:
        with open(getattr(c, where) / name, "wb") as handle:
            handle.truncate(size)
    return make


def truncate_file(where: str, name: str | None = None, keep: float = 0.02) -> Callable[[Ctx], None]:
    """Keep the first `keep` of a file. The default cuts into the data of every fixture: a weights
    file is zero-padded to 1 MiB, and the tiny LoRA file's data ends at 28 KB."""
    def edit(c: Ctx) -> None:
        path = getattr(c, where) / name if name else getattr(c, where)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
    return edit


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_json(where: str, name: str, key: str, depth: int = 100_000) -> Callable[[Ctx], None]:
    """A JSON object whose `key` is nested `depth` lists deep (recursion bombs)."""
    return write_raw(where, name, f'{{"{key}": {nested(depth)}}}'.encode())


def both(*edits: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def edit(c: Ctx) -> None:
        for one in edits:
            one(c)
    return edit


# safetensors: 8-byte little-endian header length, JSON header, data


def st_read(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


def st_write(path: Path, header: dict | bytes, data: bytes) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"


def header(edit: Callable[[dict], object], name: str = "model.safetensors") -> Callable[[Ctx], None]:
    """Edit the parsed header of the checkpoint's safetensors file (data bytes kept)."""
    def apply(c: Ctx) -> None:
        path = c.ckpt / name
        head, data = st_read(path)
        edit(head)
        st_write(path, head, data)
    return apply


def raw_header(make: Callable[[dict, bytes], tuple[bytes, bytes]]) -> Callable[[Ctx], None]:
    """Replace the header bytes (and maybe the data) of the checkpoint's safetensors file."""
    def apply(c: Ctx) -> None:
        path = c.ckpt / "model.safetensors"
        head, data = st_read(path)
        blob, data = make(head, data)
        st_write(path, blob, data)
    return apply


def set_field(tensor: str, key: str, value) -> Callable[[dict], None]:
    return lambda h: h[tensor].__setitem__(key, value)


def offsets(tensor: str, transform: Callable[[list[int]], list]) -> Callable[[dict], None]:
    return lambda h: h[tensor].__setitem__("data_offsets", transform(h[tensor]["data_offsets"]))


def overlap(h: dict) -> None:
    """The norm's range moved half into its neighbour's (same size, so only the overlap is wrong)."""
    start, end = h[NORM]["data_offsets"]
    h[NORM]["data_offsets"] = [start - 128, end - 128]


def gap(h: dict) -> None:
    """All data after the first tensor shifted, leaving 4 unused bytes (the data grows by 4)."""
    first = min(h.values(), key=lambda v: v["data_offsets"][0] if isinstance(v, dict) and "data_offsets" in v else 1 << 62)
    for value in h.values():
        if isinstance(value, dict) and "data_offsets" in value and value is not first:
            value["data_offsets"] = [o + 4 for o in value["data_offsets"]]


def with_gap(c: Ctx) -> None:
    path = c.ckpt / "model.safetensors"
    head, data = st_read(path)
    first = min(v["data_offsets"][1] for v in head.values() if isinstance(v, dict) and "data_offsets" in v)
    gap(head)
    st_write(path, head, data[:first] + b"\0" * 4 + data[first:])


def duplicate_range(h: dict) -> None:
    """Two same-size tensors claim the same bytes (the other range left unused)."""
    h["model.layers.1.input_layernorm.weight"]["data_offsets"] = list(h["model.layers.0.input_layernorm.weight"]["data_offsets"])


def dup_json_key(head: dict, data: bytes) -> tuple[bytes, bytes]:
    text = json.dumps(head)
    entry = json.dumps({NORM: head[NORM]})[1:-1]
    return ("{" + entry + ", " + text[1:]).encode(), data


def space_padded(head: dict, data: bytes) -> tuple[bytes, bytes]:
    """Valid: the format allows trailing spaces after the JSON header (8-byte alignment)."""
    blob = json.dumps(head).encode()
    return blob + b" " * (8 - len(blob) % 8 + 8), data


def pytorch_checkpoint(c: Ctx) -> None:
    """The tiny checkpoint re-saved as pytorch_model.bin (valid)."""
    import torch
    from safetensors.torch import load_file

    path = c.ckpt / "model.safetensors"
    torch.save(load_file(str(path)), c.ckpt / "pytorch_model.bin")
    path.unlink()


def malicious_pickle(c: Ctx) -> None:
    """A pytorch .bin whose pickle calls os.system: weights_only loading must refuse it, not run it."""
    import pickle

    import torch

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {c.root / MARKER}",)

    (c.ckpt / "model.safetensors").unlink()
    torch.save({"model.norm.weight": Evil()}, c.ckpt / "pytorch_model.bin", pickle_module=pickle)


def shard(c: Ctx, index: dict | None = None, files: int = 2) -> None:
    """Split the checkpoint into two shards with a model.safetensors.index.json (valid unless
    `index` replaces the index's content)."""
    from safetensors.torch import load_file, save_file

    path = c.ckpt / "model.safetensors"
    tensors = load_file(str(path))
    names = sorted(tensors)
    weight_map = {}
    for i in range(files):
        part = {n: tensors[n] for n in names[i::files]}
        shard_name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        save_file(part, str(c.ckpt / shard_name))
        weight_map.update({n: shard_name for n in part})
    path.unlink()
    (c.ckpt / "model.safetensors.index.json").write_text(json.dumps(
        index if index is not None else {"metadata": {}, "weight_map": weight_map}))


def sharded(index_edit: Callable[[dict], object] | None = None) -> Callable[[Ctx], None]:
    def apply(c: Ctx) -> None:
        shard(c)
        if index_edit is not None:
            path = c.ckpt / "model.safetensors.index.json"
            index = json.loads(path.read_text())
            replaced = index_edit(index)
            path.write_text(json.dumps(index if replaced is None else replaced))
    return apply


def drop_shard(c: Ctx) -> None:
    shard(c)
    (c.ckpt / "model-00002-of-00002.safetensors").unlink()


def trainer_folder(c: Ctx) -> None:
    """A Trainer checkpoint folder: the weights plus training state files (valid)."""
    import torch

    torch.save({"lr": 1e-4}, c.ckpt / "training_args.bin")
    torch.save({"python": 1}, c.ckpt / "rng_state.pth")
    torch.save({"state": {}}, c.ckpt / "optimizer.pt")
    (c.ckpt / "trainer_state.json").write_text("{}")


def adapter_tensors(edit: Callable[[dict], object]) -> Callable[[Ctx], None]:
    """Edit the adapter's tensors (a dict of torch tensors, PEFT names)."""
    def apply(c: Ctx) -> None:
        from safetensors.torch import load_file, save_file

        path = c.lora / "adapter_model.safetensors"
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path))
    return apply


LORA = "base_model.model.model.layers.{layer}.self_attn.{module}.lora_{half}.weight"


def lora_key(half: str, module: str = "q_proj", layer: int = 0) -> str:
    return LORA.format(layer=layer, module=module, half=half)


def poke(key: str, value: float) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        t[key] = t[key].clone()
        t[key].view(-1)[3] = value
    return edit


def fill_a(value: float) -> Callable[[dict], None]:
    """Every lora_A half filled with `value`."""
    def edit(t: dict) -> None:
        t.update({key: tensor.clone().fill_(value) for key, tensor in t.items() if "lora_A" in key})
    return edit


def zero_b(t: dict) -> None:
    t.update({key: tensor.clone().zero_() for key, tensor in t.items() if "lora_B" in key})


def dup_default_key(t: dict) -> None:
    key = lora_key("B")
    t[key.replace("lora_B.weight", "lora_B.default.weight")] = t[key].clone() * 2


def reshape(key: str, shape: tuple[int, ...]) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        import torch

        t[key] = torch.zeros(shape, dtype=t[key].dtype)
    return edit


def rank_lie(t: dict) -> None:
    """Every pair has rank 4 while adapter_config.json says r 8."""
    for key in list(t):
        t[key] = t[key][:4].clone() if "lora_A" in key else t[key][:, :4].clone()


def retype(key: str, dtype_name: str) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        import torch

        t[key] = t[key].to(getattr(torch, dtype_name))
    return edit


def add_key(key: str, shape: tuple[int, ...]) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        import torch

        t[key] = torch.zeros(shape)
    return edit


def bin_adapter(c: Ctx) -> None:
    """The adapter re-saved as PEFT's adapter_model.bin (valid)."""
    import torch
    from safetensors.torch import load_file

    path = c.lora / "adapter_model.safetensors"
    torch.save(load_file(str(path)), c.lora / "adapter_model.bin")
    path.unlink()


def kv_heads(count: int) -> Callable[[Ctx], None]:
    """config.json and the k/v projections agree on `count` KV heads (4 query heads of 16)."""
    def apply(c: Ctx) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        path = c.ckpt / "model.safetensors"
        tensors = load_file(str(path))
        for name in list(tensors):
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                tensors[name] = torch.randn(16 * count, 64) * 0.02
        save_file(tensors, str(path))
        edit_json(c.ckpt / "config.json", num_key_value_heads=count)
    return apply


def gemma2_config(**changes) -> Callable[[Ctx], None]:
    return lambda c: edit_json(c.gemma2 / "config.json", **changes)


def untied_lm_head(c: Ctx) -> None:
    """A separate lm_head (the embedding reversed and doubled) with tie_word_embeddings false."""
    from safetensors.torch import load_file, save_file

    path = c.ckpt / "model.safetensors"
    tensors = load_file(str(path))
    tensors["lm_head.weight"] = tensors[EMBED].flip(0) * 2
    save_file(tensors, str(path))
    edit_json(c.ckpt / "config.json", tie_word_embeddings=False)


def rank(r: int) -> Callable[[Ctx], None]:
    """The adapter cut to rank `r` (its first r components), adapter_config.json saying so."""
    def apply(c: Ctx) -> None:
        adapter_tensors(lambda t: t.update({k: (v[:r] if "lora_A" in k else v[:, :r]).clone() for k, v in t.items()}))(c)
        edit_json(c.lora / "adapter_config.json", r=r, lora_alpha=2 * r)
    return apply


def embedded_tokenizer(where: str) -> Callable[[Ctx], None]:
    """The tokenizer embedded in a weights file (spm_vocab_model) overwritten in place with 0xff."""
    def apply(c: Ctx) -> None:
        path = getattr(c, where)
        data = bytearray(path.read_bytes())
        tokenizer = (c.shared / "tiny-gemma" / "tokenizer.model").read_bytes()
        at = data.find(tokenizer)
        if at < 0:
            raise RuntimeError(f"{path}: embedded tokenizer not found")
        data[at + 16: at + len(tokenizer) - 16] = b"\xff" * (len(tokenizer) - 32)
        path.write_bytes(bytes(data))
    return apply


def make_fifo(where: str, name: str | None = None) -> Callable[[Ctx], None]:
    """Replace an input with a FIFO nobody writes to (opening it for reading blocks forever)."""
    def apply(c: Ctx) -> None:
        path = getattr(c, where) / name if name else getattr(c, where)
        path.unlink()
        os.mkfifo(path)
    return apply


def device_link(where: str, name: str | None, device: str) -> Callable[[Ctx], None]:
    """Replace an input with a symlink to a device (`/dev/zero`: endless zeros)."""
    def apply(c: Ctx) -> None:
        path = getattr(c, where) / name if name else getattr(c, where)
        path.unlink()
        path.symlink_to(device)
    return apply


def symlink(target: str, link: str) -> Callable[[Ctx], None]:
    return lambda c: Path(c.path(link)).symlink_to(c.path(target))


def hardlink(target: str, link: str) -> Callable[[Ctx], None]:
    return lambda c: os.link(c.path(target), c.path(link))


def mkfile(template: str, data: bytes = b"x") -> Callable[[Ctx], None]:
    def apply(c: Ctx) -> None:
        path = Path(c.path(template))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return apply


def mkdir(template: str) -> Callable[[Ctx], None]:
    return lambda c: Path(c.path(template)).mkdir(parents=True, exist_ok=True)


def tokenizer_pieces(extra: int) -> Callable[[Ctx], None]:
    """The SentencePiece model with `extra` user-defined pieces added (more pieces than vocab rows)."""
    def apply(c: Ctx) -> None:
        from sentencepiece import sentencepiece_model_pb2 as sp

        model = sp.ModelProto.FromString(c.tok.read_bytes())
        for i in range(extra):
            piece = model.pieces.add()
            piece.piece, piece.score, piece.type = f"<extra_{i}>", 0.0, 4
        c.tok.write_bytes(model.SerializeToString())
    return apply


def hf_tokenizer(tokenizer_json: bytes | None, tokenizer_config: bytes | None) -> Callable[[Ctx], None]:
    """A Hugging Face tokenizer folder `{ckpt}/hf-tok` with these files (None: absent)."""
    def apply(c: Ctx) -> None:
        folder = c.ckpt / "hf-tok"
        folder.mkdir()
        for name, data in (("tokenizer.json", tokenizer_json), ("tokenizer_config.json", tokenizer_config)):
            if data is not None:
                (folder / name).write_bytes(data)
    return apply


def flatbuffer_root(where: str, value: int) -> Callable[[Ctx], None]:
    """A weights file whose flatbuffer root offset (first 4 bytes) points elsewhere."""
    def apply(c: Ctx) -> None:
        path = getattr(c, where)
        data = bytearray(path.read_bytes())
        data[:4] = struct.pack("<I", value)
        path.write_bytes(bytes(data))
    return apply


def buffers_past_end(where: str) -> Callable[[Ctx], None]:
    """Every int64 field equal to a real buffer offset is rewritten to point 1 TB past the end."""
    def apply(c: Ctx) -> None:
        from converter.tflite import WeightFile

        path = getattr(c, where)
        weights = WeightFile(path)
        first = min(e.offset for e in weights.tensors.values() if e.nbytes)
        del weights
        data = bytearray(path.read_bytes())
        needle = struct.pack("<Q", first)
        at = data.find(needle, 0, first)
        if at < 0:
            raise RuntimeError("buffer offset not found in the flatbuffer")
        data[at: at + 8] = struct.pack("<Q", first + (1 << 40))
        path.write_bytes(bytes(data))
    return apply


# .task zips


def zip_edit(make: Callable[[bytes], bytes]) -> Callable[[Ctx], None]:
    def apply(c: Ctx) -> None:
        c.task.write_bytes(make(c.task.read_bytes()))
    return apply


def eocd(data: bytes) -> int:
    return data.rindex(b"PK\x05\x06")


def cd_offset_past_end(data: bytes) -> bytes:
    at = eocd(data) + 16
    return data[:at] + struct.pack("<I", len(data) * 4) + data[at + 4:]


def entry_offset_past_end(data: bytes) -> bytes:
    """The first central-directory entry's local header offset points past the end."""
    (cd,) = struct.unpack("<I", data[eocd(data) + 16: eocd(data) + 20])
    at = cd + 42
    return data[:at] + struct.pack("<I", len(data) + 1000) + data[at + 4:]


def entry_size_huge(data: bytes) -> bytes:
    """The first entry claims a 4 GB size (central directory and local header)."""
    (cd,) = struct.unpack("<I", data[eocd(data) + 16: eocd(data) + 20])
    (local,) = struct.unpack("<I", data[cd + 42: cd + 46])
    out = bytearray(data)
    out[cd + 20: cd + 28] = struct.pack("<II", 0xFFFFFFF0, 0xFFFFFFF0)
    out[local + 18: local + 26] = struct.pack("<II", 0xFFFFFFF0, 0xFFFFFFF0)
    return bytes(out)


def rezip(entries: Callable[[list[tuple[zipfile.ZipInfo, bytes]]], list[tuple[zipfile.ZipInfo, bytes]]],
          compress: int = zipfile.ZIP_STORED) -> Callable[[Ctx], None]:
    """Rewrite the .task with edited entries (names, duplicates, compression)."""
    def apply(c: Ctx) -> None:
        import warnings

        with zipfile.ZipFile(c.task) as archive:
            items = [(info, archive.read(info)) for info in archive.infolist()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate names on purpose
            with zipfile.ZipFile(c.task, "w", compress) as archive:
                for info, data in entries(items):
                    info.compress_type = compress
                    archive.writestr(info, data)
    return apply


def entry_named(old: str, new: str):
    def edit(items):
        for info, _ in items:
            if info.filename == old:
                info.filename = new
        return items
    return edit


def entry_data(name: str, data: bytes):
    return lambda items: [(info, data if info.filename == name else blob) for info, blob in items]


# tmpfs for disk-full cases


def small_tmpfs(size: str = "1m") -> Callable[[Ctx], None]:
    def apply(c: Ctx) -> None:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(c.out)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise Skip(f"cannot mount a tmpfs ({done.stderr.strip() or done.returncode}); run as root")
        c.mounted = True
    return apply


class Skip(Exception):
    """A case that cannot run here (no root for mount, ...)."""


# signals and truncation while a tool runs


def when_partial(action: Callable[[Ctx, multiprocessing.Process], None], within: float = 40.0):
    """Wait until a `.partial` file appears under the case folder, then act; None when the
    process ended before (the case then says the timing missed)."""
    def during(c: Ctx, proc: multiprocessing.Process) -> str | None:
        end = time.monotonic() + within
        while time.monotonic() < end and proc.is_alive():
            if any(p.name.endswith(".partial") for p in c.out.rglob("*")):
                action(c, proc)
                return None
            time.sleep(0.002)
        return "the process ended before a .partial file appeared"
    return during


def send(sig: int):
    return when_partial(lambda c, proc: os.kill(proc.pid, sig))


def after(seconds: float, sig: int):
    """Send `sig` once the run has lasted `seconds` (None), or say the process ended before."""
    def during(c: Ctx, proc: multiprocessing.Process) -> str | None:
        proc.join(seconds)
        if not proc.is_alive():
            return f"the process ended within {seconds} s"
        os.kill(proc.pid, sig)
        return None
    return during


def truncate_big(c: Ctx, proc: multiprocessing.Process) -> None:
    path = c.input / "big-gemma" / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)


def copy_big(c: Ctx) -> None:
    shutil.copytree(c.shared / "big-gemma", c.input / "big-gemma")


# checks after accepted runs


def read_weights(*templates: str) -> Callable[[Ctx], str | None]:
    def check(c: Ctx) -> str | None:
        from converter.tflite import WeightFile

        for template in templates:
            weights = WeightFile(c.path(template))
            if not weights.tensors:
                return f"{template}: no tensors"
        return None
    return check


def logits_from_lm_head(c: Ctx) -> str | None:
    """An accepted untied lm_head must be what the file's logits layer holds, not the embedding."""
    from safetensors.torch import load_file

    from converter.tflite import WeightFile

    tensors = load_file(str(c.ckpt / "model.safetensors"))
    logits = WeightFile(c.out / "model.tflite").matrix("params.lm.softmax.logits_ffn.w", *tensors[EMBED].shape)
    to_head = (logits - tensors["lm_head.weight"]).abs().max().item()
    to_embedding = (logits - tensors[EMBED]).abs().max().item()
    return None if to_head < to_embedding else "the logits layer holds the embedding: the untied lm_head was dropped"


def zero_scale_lora(c: Ctx) -> str | None:
    """lora_alpha 0 means PEFT's scale 0: an accepted adapter must change nothing."""
    import numpy as np

    from converter.tflite import WeightFile

    lora = WeightFile(c.out / "lora.tflite")
    for name in lora.tensors:
        if name.endswith("w_prime_left"):
            halves = [np.frombuffer(bytes(lora.raw(n)), np.float16) for n in (name, name[:-4] + "right")]
            if all(np.any(half != 0) for half in halves):
                return f"{name[:-13]}: non-zero LoRA written for lora_alpha 0 (PEFT's scale is 0)"
    return None


def read_task(template: str) -> Callable[[Ctx], str | None]:
    def check(c: Ctx) -> str | None:
        from bundler.task import TaskFile

        TaskFile(c.path(template)).metadata()
        return None
    return check


def reproducible(template: str, argv: list[str]) -> Callable[[Ctx], str | None]:
    """Bundling the same inputs again gives the same bytes."""
    def check(c: Ctx) -> str | None:
        first = Path(c.path(template)).read_bytes()
        result = run_tool("bundle", [c.path(a) for a in argv], c.root, TIMEOUT)
        if result.code != 0:
            return f"second run failed: {result.stderr.strip()[-300:]}"
        return None if Path(c.path(template)).read_bytes() == first else "a second run wrote different bytes"
    return check


def strict_json(path: Path) -> dict:
    def bad(value: str):
        raise ValueError(f"{value} is not JSON")
    return json.loads(path.read_text(), parse_constant=bad)


def package_safe(c: Ctx) -> str | None:
    """Manifests are strict JSON naming every packaged file, the packaged files are byte copies
    of their sources, and the generated adb script, run with a recording fake `adb`, pushes
    exactly those files and runs nothing else."""
    if any(p.name == MARKER for p in c.root.rglob("*")):
        return "injected command ran"
    manifests = list(c.out.rglob("manifest.json"))
    if not manifests and not snapshot(c.out):
        return None  # refused, and nothing was left
    if len(manifests) != 1:
        return f"expected one manifest.json, found {len(manifests)}"
    manifest = strict_json(manifests[0])
    folder = manifests[0].parent
    for entry in manifest.get("files", []):
        if not (folder / entry["name"]).is_file():
            return f"manifest lists {entry['name']!r}, not in {folder}"
        import hashlib

        if hashlib.sha256((folder / entry["name"]).read_bytes()).hexdigest() != entry["sha256"]:
            return f"{entry['name']!r} does not match its manifest sha256 (overwritten?)"
    script = c.out / "pkg" / "adb_push.sh"
    if script.exists():
        bin_dir = c.root / "fake-bin"
        bin_dir.mkdir(exist_ok=True)
        log = c.root / "adb.log"
        (bin_dir / "adb").write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done >> "{log}"\n'
                                     f'printf "\\n\\0" >> "{log}"\n')
        (bin_dir / "adb").chmod(0o755)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        done = subprocess.run(["sh", str(script)], cwd=script.parent, env=env, capture_output=True, timeout=30,
                              check=False)
        if any(p.name == MARKER for p in c.root.rglob("*")):
            return "running adb_push.sh ran an injected command"
        if done.returncode != 0:
            return f"adb_push.sh failed: {done.stderr.decode(errors='replace').strip()[-200:]}"
        pushed = [args[1] for args in (call.strip("\0").split("\0") for call in log.read_text().split("\n\0"))
                  if len(args) == 3 and args[0] == "push"]
        expected = [e["name"] for e in manifest["files"]]
        if [Path(p).name for p in pushed] != expected:
            return f"adb_push.sh pushes {pushed!r}, manifest lists {expected!r}"
        missing = [p for p in pushed if not (script.parent / p).is_file()]
        if missing:
            return f"adb_push.sh pushes files that do not exist: {missing!r}"
    return None


# --------------------------------------------------------------------------------------------
# Case tables: (name, argv, setup, extra Case fields)

CONVERT = ["--model-type", "GEMMA_2B", "--input-ckpt", "{ckpt}", "--vocab-model-file", "{tok}",
           "--output-dir", "{out}", "--quiet"]
WITH_LORA = ["--lora-ckpt", "{lora}", "--lora-rank", "8"]
CONVERT_LORA = CONVERT + WITH_LORA
BASE_OUT = ("{out}/model.tflite",)
BOTH_OUT = ("{out}/model.tflite", "{out}/lora.tflite")
CHECK = ["--model-type", "GEMMA_2B", "--input-ckpt", "{ckpt}", "--check-adapter", "{lora}"]
GEMMA_TOKENS = ["--start-token", "<bos>", "--stop-tokens", "<eos>"]
BUNDLE = ["--tflite-model", "{model}", "--tokenizer-model", "{tok}", *GEMMA_TOKENS, "--output-filename",
          "{out}/m.task"]
RUN = ["--model", "{model}", "--prompt", "one two three", "--max-tokens", "16", "--temperature", "0"]
PACKAGE = ["{model}", "--platform", "android", "--output", "{out}/pkg"]
IOS = ["{model}", "--platform", "ios", "--output", "{out}/pkg"]
LONG = "x" * 300


def label(key: str, value) -> str:
    """A case name for a JSON field set to a value: `r-null`, `r-string-8`, `target_modules-[null]`."""
    return f"{key}-string-{value}" if isinstance(value, str) else f"{key}-{json.dumps(value).replace(' ', '')}"


def refuse(name, argv, setup=None, **kw) -> tuple:
    return name, "refuse", argv, setup, kw


def accept(name, argv, setup=None, **kw) -> tuple:
    return name, "accept", argv, setup, kw


def either(name, argv, setup=None, **kw) -> tuple:
    return name, "either", argv, setup, kw


def hang(**kw) -> dict:
    return {"timeout": HANG_TIMEOUT, **kw}


def convert_checkpoint_cases() -> Iterator[tuple]:
    yield refuse("missing", [*CONVERT[:3], "{ckpt}/nowhere", *CONVERT[4:]], names=("nowhere",))
    yield refuse("empty-folder", CONVERT, lambda c: [p.unlink() for p in c.ckpt.glob("*.safetensors")])
    yield refuse("glob-matches-nothing", [*CONVERT[:3], "{ckpt}/*.nothing", *CONVERT[4:]])
    yield accept("glob", [*CONVERT[:3], "{ckpt}/*.safetensors", *CONVERT[4:]], outputs=BASE_OUT)
    yield accept("single-file", [*CONVERT[:3], "{ckpt}/model.safetensors", *CONVERT[4:]], outputs=BASE_OUT)
    yield accept("sharded-index", CONVERT, sharded(), outputs=BASE_OUT)
    yield refuse("index-missing-shard", CONVERT, drop_shard, names=("model-00002-of-00002.safetensors",))
    yield refuse("index-not-json", CONVERT, both(shard, write_raw("ckpt", "model.safetensors.index.json", b"{oops")),
                 names=("model.safetensors.index.json",))
    yield refuse("index-weight-map-list", CONVERT, sharded(lambda i: i.__setitem__("weight_map", [])),
                 names=("model.safetensors.index.json",))
    yield refuse("index-weight-map-null", CONVERT, sharded(lambda i: i.__setitem__("weight_map", None)),
                 names=("model.safetensors.index.json",))
    yield refuse("index-value-int", CONVERT, sharded(lambda i: i["weight_map"].__setitem__(NORM, 7)),
                 names=("model.safetensors.index.json",))
    yield refuse("index-is-list", CONVERT, sharded(lambda i: [1, 2]), names=("model.safetensors.index.json",))
    yield refuse("index-path-escape", CONVERT, sharded(lambda i: i["weight_map"].__setitem__(NORM, "/etc/passwd")))
    yield either("index-wrong-shard", CONVERT, sharded(
        lambda i: i["weight_map"].__setitem__(NORM, "model-00001-of-00002.safetensors"
                                              if i["weight_map"][NORM].startswith("model-00002") else
                                              "model-00002-of-00002.safetensors")), outputs=BASE_OUT)
    yield refuse("index-deep", CONVERT, both(shard, deep_json("ckpt", "model.safetensors.index.json", "weight_map")),
                 **hang())
    yield refuse("duplicate-tensor-across-shards", CONVERT, both(
        shard, lambda c: shutil.copy(c.ckpt / "model-00001-of-00002.safetensors", c.ckpt / "extra.safetensors"),
        lambda c: (c.ckpt / "model.safetensors.index.json").unlink()))
    yield accept("trainer-folder", CONVERT, trainer_folder, outputs=BASE_OUT)
    yield accept("pytorch-bin", [*CONVERT, "--ckpt-format", "pytorch"], pytorch_checkpoint, outputs=BASE_OUT)
    yield refuse("pytorch-malicious-pickle", [*CONVERT, "--ckpt-format", "pytorch"], malicious_pickle,
                 check=lambda c: "the pickle ran os.system" if (c.root / MARKER).exists() else None)
    yield refuse("pytorch-garbage", [*CONVERT, "--ckpt-format", "pytorch"],
                 both(lambda c: (c.ckpt / "model.safetensors").unlink(),
                      write_raw("ckpt", "pytorch_model.bin", b"PK\x03\x04garbage" * 10)), names=("pytorch_model.bin",))
    yield refuse("safetensors-as-pytorch", [*CONVERT[:3], "{ckpt}/model.safetensors", *CONVERT[4:],
                                            "--ckpt-format", "pytorch"])
    yield refuse("lora-file-as-checkpoint", [*CONVERT[:3], "{lora}/adapter_model.safetensors", *CONVERT[4:]])
    yield refuse("weights-bin-as-checkpoint", [*CONVERT[:3], "{model}", *CONVERT[4:]])
    yield refuse("fifo", [*CONVERT[:3], "{ckpt}/model.safetensors", *CONVERT[4:]],
                 make_fifo("ckpt", "model.safetensors"), **hang())
    yield refuse("fifo-in-folder", CONVERT, make_fifo("ckpt", "model.safetensors"), **hang())
    yield refuse("dev-zero", [*CONVERT[:3], "{ckpt}/model.safetensors", *CONVERT[4:]],
                 device_link("ckpt", "model.safetensors", "/dev/zero"), **hang())
    yield refuse("dev-null", [*CONVERT[:3], "/dev/null", *CONVERT[4:]], **hang())


def convert_header_cases() -> Iterator[tuple]:
    names = {"names": ("model.safetensors",)}
    yield refuse("empty-file", CONVERT, write_raw("ckpt", "model.safetensors", b""), **names)
    yield refuse("short-file", CONVERT, write_raw("ckpt", "model.safetensors", b"\x10\0\0"), **names)
    yield refuse("length-huge", CONVERT, write_raw("ckpt", "model.safetensors", struct.pack("<Q", 1 << 62) + b"{}"),
                 **names, **hang())
    yield refuse("length-past-end", CONVERT, write_raw("ckpt", "model.safetensors", struct.pack("<Q", 4096) + b"{}"),
                 **names)
    yield refuse("length-zero", CONVERT, raw_header(lambda h, d: (b"", d)), **names)
    yield refuse("not-json", CONVERT, raw_header(lambda h, d: (b"{not json", d)), **names)
    yield refuse("json-list", CONVERT, raw_header(lambda h, d: (b"[1, 2, 3]", d)), **names)
    yield refuse("invalid-utf8", CONVERT, raw_header(lambda h, d: (b'{"\xff\xfe": 1}', d)), **names)
    yield refuse("deep-nesting", CONVERT, raw_header(lambda h, d: (b'{"a": ' + nested(50_000).encode() + b"}", d)),
                 **names, **hang())
    yield refuse("entry-not-object", CONVERT, header(lambda h: h.__setitem__(NORM, [1, 2])), **names)
    yield refuse("entry-null", CONVERT, header(lambda h: h.__setitem__(NORM, None)), **names)
    yield refuse("dtype-unknown", CONVERT, header(set_field(NORM, "dtype", "F33")), **names)
    yield refuse("dtype-int", CONVERT, header(set_field(NORM, "dtype", 7)), **names)
    yield refuse("dtype-missing", CONVERT, header(lambda h: h[NORM].pop("dtype")), **names)
    yield refuse("shape-negative", CONVERT, header(set_field(NORM, "shape", [-64])), **names)
    yield refuse("shape-string", CONVERT, header(set_field(NORM, "shape", "64")), **names)
    yield refuse("shape-float", CONVERT, header(set_field(NORM, "shape", [64.0])), **names)
    yield refuse("shape-null", CONVERT, header(set_field(NORM, "shape", None)), **names)
    yield refuse("shape-huge", CONVERT, header(set_field(EMBED, "shape", [10**12, 10**12])), **names, **hang())
    yield refuse("shape-size-mismatch", CONVERT, header(set_field(NORM, "shape", [32])), **names)
    yield refuse("offsets-negative", CONVERT, header(offsets(NORM, lambda o: [-o[1], -o[0]])), **names)
    yield refuse("offsets-reversed", CONVERT, header(offsets(NORM, lambda o: [o[1], o[0]])), **names)
    yield refuse("offsets-three", CONVERT, header(offsets(NORM, lambda o: [*o, o[1]])), **names)
    yield refuse("offsets-strings", CONVERT, header(offsets(NORM, lambda o: [str(o[0]), str(o[1])])), **names)
    yield refuse("offsets-float", CONVERT, header(offsets(NORM, lambda o: [o[0] + 0.5, o[1] + 0.5])), **names)
    yield refuse("offsets-past-end", CONVERT, header(offsets(NORM, lambda o: [o[0] + 10**9, o[1] + 10**9])),
                 **names)
    yield refuse("offsets-huge", CONVERT, header(offsets(NORM, lambda o: [2**64 - 8, 2**64 + 248])), **names)
    yield refuse("offsets-overlap", CONVERT, header(overlap), **names)
    yield refuse("offsets-gap", CONVERT, with_gap, **names)
    yield refuse("offsets-duplicate", CONVERT, header(duplicate_range), **names)
    yield either("duplicate-json-key-same-value", CONVERT, raw_header(dup_json_key), outputs=BASE_OUT)
    yield refuse("metadata-not-object", CONVERT, header(lambda h: h.__setitem__("__metadata__", [1])), **names)
    yield refuse("metadata-not-strings", CONVERT, header(lambda h: h.__setitem__("__metadata__", {"a": 1})), **names)
    yield refuse("trailing-bytes", CONVERT, raw_header(lambda h, d: (json.dumps(h).encode(), d + b"\0" * 64)),
                 **names)
    yield refuse("truncated-data", CONVERT, truncate_file("ckpt", "model.safetensors", 0.8), **names)
    yield accept("space-padded-header", CONVERT, raw_header(space_padded), outputs=BASE_OUT)
    yield accept("tensor-order-reversed", CONVERT, header(lambda h: [h.__setitem__(k, h.pop(k)) for k in list(h)[::-1]]),
                 outputs=BASE_OUT)


def convert_config_cases() -> Iterator[tuple]:
    for key, value in (("num_hidden_layers", None), ("num_hidden_layers", "2"), ("num_hidden_layers", [2]),
                       ("num_hidden_layers", 2.5), ("num_hidden_layers", 0), ("num_hidden_layers", -2),
                       ("num_hidden_layers", True), ("hidden_size", None), ("hidden_size", {"a": 1}),
                       ("num_attention_heads", 0), ("num_key_value_heads", 0), ("head_dim", -16), ("head_dim", "16"), ("intermediate_size", -1),
                       ("vocab_size", -512), ("vocab_size", None), ("model_type", None), ("model_type", "llama"),
                       ("model_type", ["gemma"]), ("architectures", "GemmaForCausalLM"), ("architectures", [1]),
                       ("tie_word_embeddings", "no"), ("bos_token_id", 10**6), ("eos_token_id", "one")):
        yield refuse(label(key, value), CONVERT, config(**{key: value}), names=(key,))
    yield refuse("kv-heads-3-of-4-consistent-shapes", CONVERT, kv_heads(3), names=("num_key_value_heads",))
    yield refuse("kv-heads-8-of-4-consistent-shapes", CONVERT, kv_heads(8), names=("num_key_value_heads",))
    # fields a Gemma conversion may not read: refused when read, never a traceback
    for key, value in (("rms_norm_eps", -1.0), ("rms_norm_eps", "tiny"), ("max_position_embeddings", 0),
                       ("max_position_embeddings", -1), ("rope_parameters", [1]), ("rope_theta", "big"),
                       ("bos_token_id", -1)):
        yield either(label(key, value), CONVERT, config(**{key: value}), outputs=BASE_OUT)
    for key, value in (("num_hidden_layers", 10**12), ("hidden_size", 10**12), ("intermediate_size", 2**62),
                       ("vocab_size", 10**15), ("num_attention_heads", 10**9)):
        yield refuse(f"{key}-absurd", CONVERT, config(**{key: value}), **hang())
    yield either("max_position_embeddings-absurd", CONVERT, config(max_position_embeddings=10**18), outputs=BASE_OUT)
    gemma2 = ["--model-type", "GEMMA2_2B", "--input-ckpt", "{gemma2}", "--vocab-model-file", "{gemma2}/tokenizer.model",
              "--output-dir", "{out}", "--quiet"]
    yield accept("gemma2-valid", gemma2, outputs=BASE_OUT)
    for key, value in (("sliding_window", -1), ("sliding_window", 0), ("sliding_window", "4096"),
                       ("final_logit_softcapping", float("nan")), ("final_logit_softcapping", float("inf")),
                       ("attn_logit_softcapping", -1.0), ("attn_logit_softcapping", "x"),
                       ("query_pre_attn_scalar", 0), ("query_pre_attn_scalar", -16)):
        yield refuse("gemma2-" + label(key, value), gemma2, gemma2_config(**{key: value}), names=(key,))
    yield either("gemma2-final_logit_softcapping-null", gemma2, gemma2_config(final_logit_softcapping=None),
                 outputs=BASE_OUT)
    yield either("untied-lm-head", CONVERT, untied_lm_head, outputs=BASE_OUT, check=lambda c: (
        logits_from_lm_head(c) if (c.out / "model.tflite").exists() else None))
    yield refuse("not-json", CONVERT, write_raw("ckpt", "config.json", b"{'single': quotes}"), names=("config.json",))
    yield refuse("json-list", CONVERT, write_raw("ckpt", "config.json", b"[]"), names=("config.json",))
    yield refuse("json-null", CONVERT, write_raw("ckpt", "config.json", b"null"), names=("config.json",))
    yield refuse("invalid-utf8", CONVERT, write_raw("ckpt", "config.json", b'{"model_type": "gem\xffma"}'),
                 names=("config.json",))
    yield refuse("nan-literal", CONVERT, lambda c: (c.ckpt / "config.json").write_text(
        (c.ckpt / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN')),
        names=("rms_norm_eps",))
    yield refuse("deep-nesting", CONVERT, deep_json("ckpt", "config.json", "rope_parameters"), names=("config.json",),
                 **hang())
    yield refuse("is-directory", CONVERT, lambda c: ((c.ckpt / "config.json").unlink(), (c.ckpt / "config.json").mkdir()),
                 names=("config.json",))
    yield refuse("fifo", CONVERT, make_fifo("ckpt", "config.json"), names=("config.json",), **hang())
    yield refuse("dev-zero", CONVERT, device_link("ckpt", "config.json", "/dev/zero"), names=("config.json",), **hang())
    yield refuse("huge-file", CONVERT, lambda c: (c.ckpt / "config.json").write_bytes(
        b'{"pad": "' + b"x" * (64 << 20) + b'"}'), **hang())
    yield either("generation-config-garbage", CONVERT, write_raw("ckpt", "generation_config.json", b"\xff{{"),
                 outputs=BASE_OUT)
    yield either("generation-config-list", CONVERT, write_raw("ckpt", "generation_config.json", b"[]"),
                 outputs=BASE_OUT)
    yield either("unknown-extra-keys", CONVERT, config(my_custom_field={"x": [1, 2]}), outputs=BASE_OUT)
    yield refuse("no-config-tiny-sizes", CONVERT, lambda c: (c.ckpt / "config.json").unlink())  # real 2B sizes assumed


def convert_tokenizer_cases() -> Iterator[tuple]:
    def tok(value):
        return [*CONVERT[:5], value, *CONVERT[6:]]
    yield refuse("missing", tok("{ckpt}/nowhere.model"), names=("nowhere.model",))
    yield refuse("garbage", CONVERT, replace_file("tok", b"\x00garbage" * 100), names=("tokenizer.model",))
    yield refuse("empty", CONVERT, replace_file("tok", b""), names=("tokenizer.model",))
    yield refuse("truncated", CONVERT, truncate_file("tok"), names=("tokenizer.model",))
    yield refuse("more-pieces-than-vocab", CONVERT, tokenizer_pieces(10), names=("tokenizer.model",))
    yield refuse("weights-as-tokenizer", tok("{ckpt}/model.safetensors"))
    yield refuse("folder-without-tokenizer-json", tok("{lora}"))
    yield refuse("hf-tokenizer-json-list", tok("{ckpt}/hf-tok"), hf_tokenizer(b"[]", b'{"unk_token": "<unk>"}'),
                 names=("tokenizer.json",))
    yield refuse("hf-tokenizer-garbage", tok("{ckpt}/hf-tok"), hf_tokenizer(b"\xff\xfe", b'{"unk_token": "<unk>"}'),
                 names=("tokenizer.json",))
    yield refuse("hf-tokenizer-config-null", tok("{ckpt}/hf-tok"), hf_tokenizer(
        b'{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "added_tokens": []}', b"null"))
    yield refuse("fifo", CONVERT, make_fifo("tok"), **hang())
    yield refuse("dev-zero", CONVERT, device_link("tok", None, "/dev/zero"), **hang())
    yield refuse("dev-urandom", tok("/dev/urandom"), **hang())


def convert_adapter_cases() -> Iterator[tuple]:
    for key, value in (("r", 0), ("r", -8), ("r", "8"), ("r", None), ("r", 8.5), ("lora_alpha", None),
                       ("lora_alpha", "32"), ("lora_alpha", -1e309),
                       ("use_rslora", "yes"), ("rank_pattern", ["q_proj"]), ("rank_pattern", {"([": 4}),
                       ("rank_pattern", {"q_proj": 0}), ("alpha_pattern", {"q_proj": "big"}),
                       ("alpha_pattern", {"q_proj": None}), ("target_modules", 5), ("target_modules", [None]),
                       ("peft_type", "PREFIX_TUNING"), ("peft_type", "IA3"),
                       ("alora_invocation_tokens", [1, 2, 3]), ("init_lora_weights", "pissa"),
                       ("init_lora_weights", "olora"), ("init_lora_weights", "corda"), ("init_lora_weights", "loftq"),
                       ("use_dora", True), ("use_dora", "no"), ("modules_to_save", 7), ("layers_to_transform", "x")):
        yield refuse(label(key, value), CONVERT_LORA, adapter_config(**{key: value}), names=(key,))
    yield refuse("lora_alpha-huge", CONVERT_LORA, adapter_config(lora_alpha=1e308))
    yield either("lora_alpha-0", CONVERT_LORA, adapter_config(lora_alpha=0), outputs=BOTH_OUT,
                 check=lambda c: zero_scale_lora(c) if (c.out / "lora.tflite").exists() else None)
    yield refuse("rank-2-says-use-4", [*CONVERT, "--lora-ckpt", "{lora}", "--lora-rank", "2"], rank(2), names=("4",))
    yield accept("rank-2-default-rank", [*CONVERT, "--lora-ckpt", "{lora}"], rank(2), outputs=BOTH_OUT)
    yield accept("rank-4-padded-to-8", CONVERT_LORA, rank(4), outputs=BOTH_OUT)
    for key, value in (("peft_type", None), ("base_model_name_or_path", 123)):
        yield either(label(key, value), CONVERT_LORA, adapter_config(**{key: value}), outputs=BOTH_OUT)
    yield refuse("lora_alpha-nan", CONVERT_LORA, lambda c: (c.lora / "adapter_config.json").write_text(
        (c.lora / "adapter_config.json").read_text().replace('"lora_alpha": 32', '"lora_alpha": NaN')),
        names=("lora_alpha",))
    yield refuse("lora_alpha-infinity", CONVERT_LORA, lambda c: (c.lora / "adapter_config.json").write_text(
        (c.lora / "adapter_config.json").read_text().replace('"lora_alpha": 32', '"lora_alpha": Infinity')),
        names=("lora_alpha",))
    yield either("base-model-tilde-user", CONVERT_LORA,
                 adapter_config(base_model_name_or_path="~nosuchuser9/gemma"), outputs=BOTH_OUT)
    yield either("base-model-tilde", CONVERT_LORA, adapter_config(base_model_name_or_path="~/x/../gemma"),
                 outputs=BOTH_OUT)
    yield refuse("config-not-json", CONVERT_LORA, write_raw("lora", "adapter_config.json", b"{r: 8"),
                 names=("adapter_config.json",))
    yield refuse("config-list", CONVERT_LORA, write_raw("lora", "adapter_config.json", b"[]"),
                 names=("adapter_config.json",))
    yield refuse("config-invalid-utf8", CONVERT_LORA, write_raw("lora", "adapter_config.json", b'{"r": 8, "\xff": 1}'),
                 names=("adapter_config.json",))
    yield refuse("config-deep", CONVERT_LORA, deep_json("lora", "adapter_config.json", "rank_pattern"),
                 names=("adapter_config.json",), **hang())
    yield refuse("config-is-directory", CONVERT_LORA, lambda c: (
        (c.lora / "adapter_config.json").unlink(), (c.lora / "adapter_config.json").mkdir()),
        names=("adapter_config.json",))
    yield refuse("config-fifo", CONVERT_LORA, make_fifo("lora", "adapter_config.json"), **hang())
    yield refuse("weights-fifo", CONVERT_LORA, make_fifo("lora", "adapter_model.safetensors"), **hang())
    yield refuse("weights-dev-zero", CONVERT_LORA, device_link("lora", "adapter_model.safetensors", "/dev/zero"),
                 **hang())
    yield refuse("file-fifo", [*CONVERT, "--lora-ckpt", "{lora}/adapter_model.safetensors", "--lora-rank", "8"],
                 make_fifo("lora", "adapter_model.safetensors"), **hang())
    yield refuse("missing", [*CONVERT, "--lora-ckpt", "{ckpt}/no-adapter", "--lora-rank", "8"], names=("no-adapter",))
    yield refuse("empty-folder", CONVERT_LORA, lambda c: [p.unlink() for p in c.lora.iterdir()])
    yield refuse("no-weights", CONVERT_LORA, lambda c: (c.lora / "adapter_model.safetensors").unlink())
    yield refuse("garbage-file", [*CONVERT, "--lora-ckpt", "{lora}/junk.safetensors", "--lora-rank", "8"],
                 write_raw("lora", "junk.safetensors", b"not safetensors at all"), names=("junk.safetensors",))
    yield refuse("base-as-adapter", [*CONVERT, "--lora-ckpt", "{ckpt}/model.safetensors", "--lora-rank", "8"])
    yield accept("bare-file", [*CONVERT, "--lora-ckpt", "{lora}/adapter_model.safetensors", "--lora-rank", "8"],
                 outputs=BOTH_OUT)
    yield refuse("nan-a", CONVERT_LORA, adapter_tensors(poke(lora_key("A"), float("nan"))), names=("lora_A",))
    yield refuse("inf-b", CONVERT_LORA, adapter_tensors(poke(lora_key("B", "v_proj", 1), float("-inf"))),
                 names=("lora_B",))
    yield refuse("all-nan", CONVERT_LORA, adapter_tensors(fill_a(float("nan"))))
    yield refuse("fp16-overflow-after-scale", CONVERT_LORA, both(
        adapter_tensors(poke(lora_key("B"), 60000.0)), adapter_config(lora_alpha=3.0e6)))
    yield refuse("duplicate-default-key", CONVERT_LORA, adapter_tensors(dup_default_key), names=("q_proj",))
    yield refuse("shape-wrong-a", CONVERT_LORA, adapter_tensors(reshape(lora_key("A"), (8, 65))), names=("lora_A",))
    yield refuse("shape-wrong-b", CONVERT_LORA, adapter_tensors(reshape(lora_key("B"), (63, 8))), names=("lora_B",))
    yield refuse("shape-3d", CONVERT_LORA, adapter_tensors(reshape(lora_key("A"), (8, 8, 8))), names=("lora_A",))
    yield refuse("rank-halves-differ", CONVERT_LORA, adapter_tensors(reshape(lora_key("B"), (64, 4))),
                 names=("q_proj",))
    yield refuse("rank-lies", CONVERT_LORA, adapter_tensors(rank_lie))
    yield refuse("int-dtype", CONVERT_LORA, adapter_tensors(retype(lora_key("A"), "int32")), names=("lora_A",))
    yield refuse("missing-b", CONVERT_LORA, adapter_tensors(lambda t: t.pop(lora_key("B"))), names=("q_proj",))
    yield refuse("unknown-key", CONVERT_LORA, adapter_tensors(add_key("base_model.model.model.mystery", (4,))),
                 names=("mystery",))
    yield refuse("layer-beyond-model", CONVERT_LORA, adapter_tensors(add_key(lora_key("A", layer=7), (8, 64))),
                 names=("q_proj",))
    yield refuse("no-tensors", CONVERT_LORA, adapter_tensors(lambda t: t.clear()))
    yield accept("zero-b-warns", CONVERT_LORA, adapter_tensors(zero_b), outputs=BOTH_OUT, warns=True)
    yield accept("target-not-in-model-warns", CONVERT_LORA,
                 adapter_config(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "out_proj"]),
                 outputs=BOTH_OUT, warns=True)
    yield accept("bin-adapter", CONVERT_LORA, bin_adapter, outputs=BOTH_OUT)
    yield accept("rank-defaults", CONVERT + ["--lora-ckpt", "{lora}"], outputs=BOTH_OUT)
    check = CHECK
    yield accept("check-adapter", check, outputs=())
    yield refuse("check-adapter-nan", check, adapter_tensors(fill_a(float("nan"))))
    yield refuse("check-adapter-dup-keys", check, adapter_tensors(dup_default_key))
    yield refuse("check-adapter-missing", [*check[:5], "{ckpt}/none"], names=("none",))
    yield refuse("check-adapter-alpha-null", check, adapter_config(lora_alpha=None), names=("lora_alpha",))
    yield refuse("check-adapter-fifo", check, make_fifo("lora", "adapter_model.safetensors"), **hang())


def convert_flag_cases() -> Iterator[tuple]:
    def lora(*extra):
        return [*CONVERT, "--lora-ckpt", "{lora}", *extra]
    yield refuse("lora-rank-0", lora("--lora-rank", "0"), names=("--lora-rank",))
    yield refuse("lora-rank-negative", lora("--lora-rank", "-8"), names=("--lora-rank",))
    yield refuse("lora-rank-below-adapter", lora("--lora-rank", "4"), names=("--lora-rank",))
    yield refuse("lora-rank-huge", lora("--lora-rank", str(10**30)), names=("--lora-rank",))
    yield refuse("lora-rank-not-int", lora("--lora-rank", "eight"), names=("--lora-rank",))
    yield refuse("lora-rank-without-adapter", [*CONVERT, "--lora-rank", "8"], names=("--lora-rank",))
    yield refuse("lora-output-without-adapter", [*CONVERT, "--lora-output-tflite-file", "{out}/l.bin"],
                 names=("--lora-output-tflite-file",))
    yield refuse("max-rank-0", lora("--lora-rank", "8", "--max-rank", "0"), names=("--max-rank",))
    yield refuse("max-rank-negative", lora("--lora-rank", "8", "--max-rank", "-1"), names=("--max-rank",))
    yield refuse("max-adapter-mb-negative", lora("--lora-rank", "8", "--max-adapter-mb", "-1"),
                 names=("--max-adapter-mb",))
    yield refuse("max-adapter-mb-nan", lora("--lora-rank", "8", "--max-adapter-mb", "nan"),
                 names=("--max-adapter-mb",), area="adapter")
    yield refuse("max-adapter-mb-too-small", lora("--lora-rank", "8", "--max-adapter-mb", "0.001"))
    yield refuse("quantization-unknown", [*CONVERT, "--quantization", "int3"], names=("--quantization",))
    yield refuse("model-type-unknown", [*CONVERT[:1], "NOPE", *CONVERT[2:]], names=("NOPE",))
    yield refuse("model-type-empty", [*CONVERT[:1], "", *CONVERT[2:]])
    yield refuse("model-type-other-family", [*CONVERT[:1], "PHI_2", *CONVERT[2:]])
    yield refuse("backend-unknown", [*CONVERT, "--backend", "tpu"], names=("--backend",))
    yield refuse("lora-scaling-unknown", [*CONVERT_LORA, "--lora-scaling", "half"], names=("--lora-scaling",))
    yield refuse("unknown-option", [*CONVERT, "--frobnicate"], names=("--frobnicate",))
    yield refuse("missing-model-type", CONVERT[2:], names=("--model-type",))
    yield refuse("missing-output-dir", CONVERT[:6] + ["--quiet"], names=("--output-dir",))
    yield refuse("merge-without-adapter", [*CONVERT, "--merge-lora"], names=("--merge-lora",))
    yield refuse("merge-unsupported-alone", [*CONVERT_LORA, "--merge-unsupported"], names=("--merge-unsupported",))
    yield refuse("merge-with-rank", [*CONVERT_LORA, "--merge-lora"], names=("--lora-rank",))
    yield refuse("merge-with-raw-scaling", [*CONVERT, "--lora-ckpt", "{lora}", "--merge-lora", "--lora-scaling", "raw"],
                 names=("--lora-scaling",))
    yield accept("merge", [*CONVERT, "--lora-ckpt", "{lora}", "--merge-lora"], outputs=BASE_OUT)
    yield accept("dry-run-writes-nothing", [*CONVERT_LORA, "--dry-run"], outputs=(),
                 check=lambda c: f"wrote {list(c.out.iterdir())}" if list(c.out.iterdir()) else None)
    yield accept("fp32-dry-run", [*CONVERT, "--quantization", "fp32", "--dry-run"])
    yield refuse("dry-run-nan-adapter", [*CONVERT_LORA, "--dry-run"], adapter_tensors(fill_a(float("nan"))),
                 area="adapter")
    yield accept("int4", [*CONVERT_LORA, "--quantization", "int4"], outputs=BOTH_OUT)
    yield accept("fp32", [*CONVERT_LORA, "--quantization", "fp32"], outputs=BOTH_OUT)
    yield accept("mediapipe-compat", [*CONVERT_LORA, "--mediapipe-compat"], outputs=BOTH_OUT)
    yield accept("repeated-option-last-wins", [*CONVERT, "--quantization", "int4", "--quantization", "int8"],
                 outputs=BASE_OUT)


def convert_output_cases() -> Iterator[tuple]:
    def base(path):
        return [*CONVERT, "--output-tflite-file", path]
    def lora_out(path):
        return [*CONVERT_LORA, "--lora-output-tflite-file", path]
    for kind, target, name in (("checkpoint", "{ckpt}/model.safetensors", "model.safetensors"),
                                ("tokenizer", "{tok}", "tokenizer.model"), ("config", "{ckpt}/config.json", "config.json"),
                                ("dotdot-checkpoint", "{out}/../in/tiny-gemma/model.safetensors", "model.safetensors")):
        yield refuse(f"base-is-{kind}", base(target), lambda c: c.ckpt, names=(name,))
    yield refuse("lora-is-adapter-weights", lora_out("{lora}/adapter_model.safetensors"),
                 names=("adapter_model.safetensors",))
    yield refuse("lora-is-checkpoint", lora_out("{ckpt}/model.safetensors"), names=("model.safetensors",))
    yield refuse("base-is-symlink-to-checkpoint", base("{out}/link.bin"),
                 symlink("{ckpt}/model.safetensors", "{out}/link.bin"))
    yield refuse("base-is-hardlink-to-checkpoint", base("{out}/hard.bin"),
                 hardlink("{ckpt}/model.safetensors", "{out}/hard.bin"))
    yield refuse("base-is-hardlink-to-tokenizer", base("{out}/hard.bin"), hardlink("{tok}", "{out}/hard.bin"))
    yield refuse("lora-is-hardlink-to-adapter", lora_out("{out}/hard.bin"),
                 hardlink("{lora}/adapter_model.safetensors", "{out}/hard.bin"))
    yield refuse("base-equals-lora-output", [*CONVERT_LORA, "--output-tflite-file", "{out}/same.bin",
                                             "--lora-output-tflite-file", "{out}/same.bin"],
                 names=("--lora-output-tflite-file",))
    yield refuse("output-dir-is-file", [*CONVERT[:7], "{out}/file", "--quiet"], mkfile("{out}/file"),
                 check=lambda c: None if (c.out / "file").read_bytes() == b"x" else "the file was changed")
    yield refuse("output-dir-under-file", [*CONVERT[:7], "{out}/file/sub", "--quiet"], mkfile("{out}/file"))
    yield refuse("output-file-under-file", base("{out}/file/model.bin"), mkfile("{out}/file"))
    yield refuse("output-file-is-directory", base("{out}/dir"), mkdir("{out}/dir"))
    yield refuse("output-in-proc", [*CONVERT[:7], "/proc/self/lora-convert-test", "--quiet"])
    yield refuse("output-in-sys", base("/sys/lora-convert-test.bin"))
    yield refuse("output-name-too-long", base("{out}/" + LONG + ".bin"))
    yield refuse("output-dir-name-too-long", [*CONVERT[:7], "{out}/" + LONG, "--quiet"])
    yield either("output-empty-name", base(""), outputs=BASE_OUT)
    yield accept("existing-output-replaced", base("{out}/model.bin"), mkfile("{out}/model.bin", b"old" * 10),
                 outputs=("{out}/model.bin",))
    yield accept("output-dir-created-nested", [*CONVERT[:7], "{out}/a/b/c", "--quiet"],
                 outputs=("{out}/a/b/c/model.tflite",))
    yield accept("output-symlink-to-new-file", base("{out}/link.bin"), symlink("{out}/target.bin", "{out}/link.bin"),
                 outputs=("{out}/link.bin",))
    for kind, name in (("spaces", "my model dir"), ("quotes", "it's \"quoted\""), ("unicode", "modèle-日本"),
                        ("dollar", "$HOME `x`"), ("leading-dash", "-model"), ("newline", "new\nline")):
        ckpt = "{input}/" + name + "/ckpt"
        yield accept(f"path-with-{kind}", ["--model-type", "GEMMA_2B", "--input-ckpt", ckpt, "--vocab-model-file",
                                           ckpt + "/tokenizer.model", "--output-dir", "{out}/" + name, "--quiet",
                                           "--lora-ckpt", "{lora}", "--lora-rank", "8"],
                     lambda c, n=name: (c.input.joinpath(n).mkdir(), c.ckpt.rename(c.input / n / "ckpt")),
                     outputs=("{out}/" + name + "/model.tflite", "{out}/" + name + "/lora.tflite"))
    yield accept("relative-paths", ["--model-type", "GEMMA_2B", "--input-ckpt", "in/tiny-gemma", "--vocab-model-file",
                                    "in/tiny-gemma/tokenizer.model", "--output-dir", "out", "--quiet"],
                 lambda c: c.ckpt, outputs=BASE_OUT)
    yield accept("symlinked-inputs", [*CONVERT[:3], "{input}/ckpt-link", "--vocab-model-file", "{input}/tok-link",
                                      "--output-dir", "{out}", "--quiet"],
                 both(symlink("{ckpt}", "{input}/ckpt-link"), symlink("{tok}", "{input}/tok-link")), outputs=BASE_OUT)
    # the tiny base file holds 184 KB of data (the rest of its 1 MiB is a hole), the LoRA file 28 KB
    yield refuse("disk-full", CONVERT_LORA, small_tmpfs("100k"), needs_root=True)
    yield refuse("disk-full-lora-only", CONVERT_LORA, small_tmpfs("200k"), needs_root=True)


def convert_process_cases() -> Iterator[tuple]:
    big = ["--model-type", "GEMMA_2B", "--input-ckpt", "{big}", "--vocab-model-file", "{big}/tokenizer.model",
           "--output-dir", "{out}", "--quiet"]
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        yield refuse(f"{sig.name.lower()}", big, during=send(sig), area="io")
    yield refuse("sigbus-truncated-while-mapped", [*big[:3], "{input}/big-gemma", *big[4:5],
                                                   "{input}/big-gemma/tokenizer.model", *big[6:]],
                 copy_big, during=when_partial(truncate_big), inputs_change=True, area="io")
    yield either("concurrent-same-output", CONVERT_LORA, parallel=2, outputs=BOTH_OUT)


def bundle_cases() -> Iterator[tuple]:
    def with_(option: str, value: str) -> list[str]:
        argv = list(BUNDLE)
        argv[argv.index(option) + 1] = value
        return argv

    task_out = ("{out}/m.task",)
    yield accept("valid", BUNDLE, outputs=task_out, check=read_task("{out}/m.task"))
    yield accept("task-reproducible", BUNDLE, outputs=task_out, check=reproducible("{out}/m.task", BUNDLE))
    lite = [*with_("--output-filename", "{out}/m.litertlm"), "--format", "litertlm"]
    yield accept("litertlm", lite, outputs=("{out}/m.litertlm",))
    yield accept("litertlm-reproducible", lite, outputs=("{out}/m.litertlm",),
                 check=reproducible("{out}/m.litertlm", lite))
    yield accept("extension-appended", with_("--output-filename", "{out}/m"), outputs=task_out)
    yield accept("existing-output-replaced", BUNDLE, mkfile("{out}/m.task", b"old"), outputs=task_out,
                 check=read_task("{out}/m.task"))
    yield accept("unicode-prompts", [*BUNDLE, "--prompt-prefix", "<start_of_turn>user\\n日本 ✓ \"'$(x)",
                                     "--prompt-suffix", "\\t\\\\n", "--system-prompt", "Sé breve.\n"],
                 outputs=task_out, check=read_task("{out}/m.task"))
    yield accept("path-with-quotes", with_("--output-filename", "{out}/it's \"a\" $(x).task"),
                 outputs=("{out}/it's \"a\" $(x).task",))
    yield accept("multiple-stop-tokens", [*BUNDLE, "--stop-tokens", "<pad>", "--stop-tokens", "<eos>"],
                 outputs=task_out)
    yield refuse("task-as-model", with_("--tflite-model", "{task}"))
    for option, where in (("--tflite-model", "model"), ("--tokenizer-model", "tok")):
        short = option.strip("-").split("-")[0]
        yield refuse(f"{short}-missing", with_(option, "{out}/../none.bin"), names=("none.bin",))
        yield refuse(f"{short}-garbage", BUNDLE, replace_file(where, b"\x01garbage" * 64))
        yield refuse(f"{short}-empty", BUNDLE, replace_file(where, b""))
        yield refuse(f"{short}-truncated", BUNDLE, truncate_file(where))
        yield refuse(f"{short}-directory", with_(option, "{input}"))
        yield refuse(f"{short}-fifo", BUNDLE, make_fifo(where), **hang())
        yield refuse(f"{short}-dev-zero", BUNDLE, device_link(where, None, "/dev/zero"), **hang())
        yield refuse(f"output-is-{short}", with_("--output-filename", "{" + where + "}"))
    yield refuse("tflite-lora-as-model", with_("--tflite-model", "{adapter}"))
    yield refuse("tflite-checkpoint-as-model", with_("--tflite-model", "{ckpt}/model.safetensors"))
    yield refuse("tflite-root-past-end", BUNDLE, flatbuffer_root("model", 0x7FFFFFF0))
    yield refuse("tflite-buffers-past-end", BUNDLE, buffers_past_end("model"))
    yield refuse("tokenizer-too-big-for-model", BUNDLE, tokenizer_pieces(10))
    yield refuse("tokenizer-hardlink-output", with_("--output-filename", "{out}/t.task"), hardlink("{tok}", "{out}/t.task"))
    yield refuse("start-token-unknown", with_("--start-token", "<nope>"), names=("<nope>",))
    yield refuse("start-token-empty", with_("--start-token", ""), names=("--start-token",))
    yield refuse("stop-token-unknown", with_("--stop-tokens", "<nope>"), names=("<nope>",))
    yield refuse("start-token-invalid-utf8", with_("--start-token", "<b\udcffos>"))
    yield refuse("prompt-prefix-invalid-utf8", [*BUNDLE, "--prompt-prefix", "user\udcff"], names=("--prompt-prefix",))
    yield refuse("output-under-file", with_("--output-filename", "{out}/file/m.task"), mkfile("{out}/file"))
    yield refuse("output-is-directory", with_("--output-filename", "{out}/dir.task"), mkdir("{out}/dir.task"))
    yield refuse("output-in-proc", with_("--output-filename", "/proc/self/m.task"))
    yield refuse("output-name-too-long", with_("--output-filename", "{out}/" + LONG + ".task"))
    yield refuse("output-empty", with_("--output-filename", ""))
    yield refuse("format-unknown", [*BUNDLE, "--format", "zip"], names=("--format",))
    yield refuse("litertlm-garbage-model", [*with_("--output-filename", "{out}/m.litertlm"), "--format", "litertlm"],
                 replace_file("model", b"junk" * 100))
    yield refuse("litertlm-output-is-model", [*with_("--output-filename", "{model}"), "--format", "litertlm"])
    yield refuse("missing-stop-tokens", BUNDLE[:6] + BUNDLE[8:], names=("--stop-tokens",))
    yield refuse("disk-full", BUNDLE, small_tmpfs("1m"), needs_root=True)
    yield refuse("sigterm", [*with_("--tflite-model", "{input}/big.bin")], lambda c: shutil.copy(
        c.shared / "big.bin", c.input / "big.bin"), during=send(signal.SIGTERM), area="io")
    yield either("concurrent-same-output", BUNDLE, parallel=2, outputs=task_out, check=read_task("{out}/m.task"))


def inspect_cases() -> Iterator[tuple]:
    yield accept("task", ["{task}"])
    yield accept("task-json", ["{task}", "--json"])
    yield accept("weights", ["{model}"])
    yield accept("lora", ["{adapter}", "--no-hash"])
    yield either("litertlm", ["{litertlm}"])
    yield refuse("missing", ["{out}/none.task"], names=("none.task",))
    yield refuse("directory", ["{input}"])
    yield refuse("empty", ["{task}"], replace_file("task", b""))
    yield refuse("garbage", ["{task}"], replace_file("task", b"\x00\x01garbage" * 100))
    yield refuse("text-file", ["{task}"], replace_file("task", b"hello world\n"))
    yield refuse("task-truncated", ["{task}"], truncate_file("task"))
    yield refuse("task-truncated-tail", ["{task}"], truncate_file("task", keep=0.999))
    yield refuse("weights-truncated", ["{model}"], truncate_file("model", keep=0.15))  # inside the data
    yield refuse("weights-first-kb", ["{model}"], truncate_file("model", keep=0.001))
    yield refuse("weights-root-past-end", ["{model}"], flatbuffer_root("model", 0x7FFFFFF0))
    yield refuse("weights-embedded-tokenizer-garbage", ["{model}"], embedded_tokenizer("model"))
    yield refuse("weights-buffers-past-end", ["{model}"], buffers_past_end("model"))
    yield refuse("litertlm-truncated", ["{litertlm}"], truncate_file("litertlm"))
    yield refuse("litertlm-garbage", ["{litertlm}"], lambda c: c.litertlm.write_bytes(
        c.litertlm.read_bytes()[:8] + b"\xff" * 4096))
    yield refuse("zip-cd-past-end", ["{task}"], zip_edit(cd_offset_past_end))
    yield refuse("zip-entry-past-end", ["{task}"], zip_edit(entry_offset_past_end))
    yield refuse("zip-entry-size-huge", ["{task}"], zip_edit(entry_size_huge))
    yield refuse("zip-no-eocd", ["{task}"], zip_edit(lambda d: d[:eocd(d)]))
    yield refuse("zip-compressed", ["{task}"], rezip(lambda items: items, zipfile.ZIP_DEFLATED))
    yield refuse("zip-missing-metadata", ["{task}"], rezip(lambda items: [i for i in items if i[0].filename != "METADATA"]))
    yield refuse("zip-metadata-garbage", ["{task}"], rezip(entry_data("METADATA", b"\xff" * 50)))
    yield refuse("zip-tokenizer-garbage", ["{task}"], rezip(entry_data("TOKENIZER_MODEL", b"\xff" * 50)))
    yield refuse("zip-model-garbage", ["{task}"], rezip(entry_data("TF_LITE_PREFILL_DECODE", b"TFL3" * 50)))
    yield either("zip-duplicate-entry", ["{task}"], rezip(lambda items: items + [items[-1]]))
    yield either("zip-traversal-name", ["{task}"], rezip(lambda items: items + [(zipfile.ZipInfo("../../evil"), b"x")]))
    yield refuse("fifo", ["{task}"], make_fifo("task"), **hang())
    yield refuse("dev-zero", ["/dev/zero"], **hang())
    yield refuse("dev-zero-named-task", ["{task}"], device_link("task", None, "/dev/zero"), **hang())


def package_cases() -> Iterator[tuple]:
    def lora(spec, platform=PACKAGE):
        return [*platform, "--lora", spec]
    safe = {"check": package_safe}
    yield accept("android", lora("{adapter}"), **safe)
    yield accept("ios", lora("{adapter}", IOS), **safe)
    yield accept("task-model", ["{task}", *PACKAGE[1:]], **safe)
    yield accept("named-lora", lora("chat={adapter}"), **safe)
    yield accept("existing-output-folder", lora("{adapter}"), mkdir("{out}/pkg"), **safe)
    for kind, filename in (("quote", "a';touch PWNED;'.bin"), ("double-quote", 'a";touch PWNED;".bin'),
                            ("dollar", "$(touch PWNED).bin"), ("backtick", "`touch PWNED`.bin"),
                            ("newline", "a\ntouch PWNED\n.bin"), ("space-dash", "-rf x.bin"),
                            ("semicolon", "x;touch PWNED.bin")):
        def setup(c, f=filename):
            return shutil.copy(c.adapter, c.input / f)
        yield either(f"lora-name-{kind}", lora("good={input}/" + filename), setup, **safe)
        yield either(f"model-name-{kind}", ["{input}/" + filename, *PACKAGE[1:]],
                     lambda c, f=filename: shutil.copy(c.model, c.input / f), **safe)
    yield either("ios-lora-named-manifest", lora("m={input}/manifest.json", IOS),
                 lambda c: shutil.copy(c.adapter, c.input / "manifest.json"), **safe)
    yield either("android-lora-named-manifest", lora("m={input}/manifest.json"),
                 lambda c: shutil.copy(c.adapter, c.input / "manifest.json"), **safe)
    yield either("ios-lora-named-plist", lora("m={input}/llm.plist", IOS),
                 lambda c: shutil.copy(c.adapter, c.input / "llm.plist"), **safe)
    yield refuse("lora-name-traversal", lora("../../evil={adapter}"))
    yield refuse("lora-name-empty", lora("={adapter}"))
    yield refuse("lora-name-injection", lora("x';touch PWNED;'={adapter}"))
    yield refuse("lora-duplicate-names", [*lora("a={adapter}"), "--lora", "a={adapter}"], names=("a",))
    yield refuse("lora-missing", lora("{out}/none.bin"), names=("none.bin",))
    yield refuse("lora-garbage", lora("{adapter}"), replace_file("adapter", b"junk" * 300))
    yield refuse("lora-is-base", lora("{model}"))
    yield refuse("lora-is-directory", lora("{input}"))
    yield refuse("lora-fifo", lora("{adapter}"), make_fifo("adapter"), **hang())
    yield refuse("lora-dev-zero", lora("{adapter}"), device_link("adapter", None, "/dev/zero"), **hang())
    yield refuse("model-missing", ["{out}/none.bin", *PACKAGE[1:]], names=("none.bin",))
    yield refuse("model-garbage", PACKAGE, replace_file("model", b"junk" * 300))
    yield refuse("model-is-lora", ["{adapter}", *PACKAGE[1:]])
    yield refuse("model-fifo", PACKAGE, make_fifo("model"), **hang())
    yield refuse("model-dev-zero", PACKAGE, device_link("model", None, "/dev/zero"), **hang())
    yield refuse("model-truncated", PACKAGE, truncate_file("model"))
    for option, value in (("--max-tokens", "0"), ("--max-tokens", "-1"), ("--top-k", "0"), ("--top-k", "-5"),
                          ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
                          ("--random-seed", str(2**40)), ("--max-tokens", str(2**31))):
        yield refuse(f"{option.strip('-')}-{value}", [*PACKAGE, option, value], names=(option,))
    for value in ("", "a/b", "..", "x'y", "llm\n", "-x"):
        yield refuse(f"pack-name-{value.encode().hex() or 'empty'}", [*PACKAGE, "--pack-name", value],
                     names=("--pack-name",))
    yield refuse("platform-unknown", [*PACKAGE[:2], "web", *PACKAGE[3:]], names=("--platform",))
    yield refuse("output-is-file", [*PACKAGE[:3], "{out}/file"], mkfile("{out}/file"))
    yield refuse("output-under-file", [*PACKAGE[:3], "{out}/file/pkg"], mkfile("{out}/file"))
    yield refuse("output-in-proc", [*PACKAGE[:3], "/proc/self/pkg"])
    yield refuse("output-overwrites-model", ["{input}/llm/model.bin", "--platform", "ios", "--output", "{input}"],
                 lambda c: (c.input.joinpath("llm").mkdir(), shutil.copy(c.model, c.input / "llm" / "model.bin")))
    yield refuse("disk-full", lora("{adapter}"), small_tmpfs("1m"), needs_root=True)
    yield refuse("sigterm", ["{input}/big.bin", *PACKAGE[1:]], lambda c: shutil.copy(c.shared / "big.bin", c.input / "big.bin"),
                 during=send(signal.SIGTERM), area="io")


def lora_run_cases() -> Iterator[tuple]:
    def with_(option: str, value: str) -> list[str]:
        argv = list(RUN)
        argv[argv.index(option) + 1] = value
        return argv

    yield accept("greedy", RUN)
    yield accept("with-lora", [*RUN, "--lora", "{adapter}"])
    yield accept("task", with_("--model", "{task}"))
    yield accept("sampling-seed-negative", [*RUN[:-2], "--temperature", "0.8", "--random-seed", "-1"])
    yield accept("unicode-prompt", [*with_("--prompt", "日本語 ✓ \"' $(x) \n\t"), "--max-tokens", "64"])
    yield either("empty-prompt", with_("--prompt", ""))
    yield refuse("prompt-invalid-utf8", with_("--prompt", "one \udcff two"), names=("--prompt",))
    yield refuse("prompt-longer-than-max-tokens", with_("--prompt", "one two " * 200), names=("--max-tokens",))
    for value in ("0", "-1", "1000000000", "100000"):
        yield refuse(f"max-tokens-{value}", with_("--max-tokens", value), names=("--max-tokens",), **hang())
    for value in ("0", "-1", str(2**40)):
        yield refuse(f"top-k-{value}", [*RUN, "--top-k", value], names=("--top-k",))
    for value in ("nan", "inf", "-1", "-inf"):
        yield refuse(f"temperature-{value}", with_("--temperature", value), names=("--temperature",))
    for value in (str(2**64), str(-(2**63))):
        yield refuse(f"seed-{value}", [*RUN, "--random-seed", value], names=("--random-seed",))
    yield refuse("max-tokens-not-int", with_("--max-tokens", "many"), names=("--max-tokens",))
    for option, where in (("--model", "model"), ("--lora", "adapter"), ("--tokenizer", "tok")):
        argv = RUN if option == "--model" else [*RUN, option, "{" + where + "}"]
        short = option.strip("-")
        yield refuse(f"{short}-missing", [*argv, option, "{out}/none.bin"], names=("none.bin",))
        yield refuse(f"{short}-garbage", argv, replace_file(where, b"\x02junk" * 100))
        yield refuse(f"{short}-empty", argv, replace_file(where, b""))
        yield refuse(f"{short}-truncated", argv, truncate_file(where))
        yield refuse(f"{short}-directory", [*argv, option, "{input}"])
        yield refuse(f"{short}-fifo", argv, make_fifo(where), **hang())
        yield refuse(f"{short}-dev-zero", argv, device_link(where, None, "/dev/zero"), **hang())
    yield refuse("lora-as-model", with_("--model", "{adapter}"))
    yield refuse("model-as-lora", [*RUN, "--lora", "{model}"])
    yield refuse("checkpoint-as-model", with_("--model", "{ckpt}/model.safetensors"))
    yield refuse("model-root-past-end", RUN, flatbuffer_root("model", 0x7FFFFFF0))
    yield refuse("model-buffers-past-end", RUN, buffers_past_end("model"))
    yield refuse("tokenizer-too-big", [*RUN, "--tokenizer", "{tok}"], tokenizer_pieces(10))
    yield refuse("embedded-tokenizer-garbage", RUN, embedded_tokenizer("model"))
    yield refuse("sigint", ["--model", "{input}/big.bin", "--prompt", "one two three", "--max-tokens", "4000",
                            "--temperature", "0"], lambda c: shutil.copy(c.shared / "big.bin", c.input / "big.bin"),
                 during=after(3.0, signal.SIGINT), area="run")
    yield refuse("task-tokenizer-garbage", with_("--model", "{task}"),
                 rezip(entry_data("TOKENIZER_MODEL", b"\xff" * 50)))
    yield refuse("lora-from-other-model", [*RUN, "--lora", "{input}/other.bin"], lambda c: shutil.copy(
        c.shared / "big-lora.bin", c.input / "other.bin"))
    yield refuse("compare-without-hf-model", [*RUN, "--compare"], names=("--hf-model",))


GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "one two three"},
                                    {"role": "assistant", "content": "four five"}]})
EVAL = ["{input}/data.jsonl", "--model", "{model}", "--lora", "{adapter}", "--max-tokens", "16"]


def copy_shared(name: str, to: str) -> Callable[[Ctx], None]:
    """A shared artifact copied into the case's input folder under another name."""
    def copy(c: Ctx) -> None:
        shutil.copy(c.shared / name, c.input / to)
    return copy


def eval_data(*lines: bytes | str, good: bool = True) -> Callable[[Ctx], None]:
    """`{input}/data.jsonl`: these lines, after one good chat example unless `good` is False."""
    raw = [line.encode() if isinstance(line, str) else line for line in lines]
    return write_raw("input", "data.jsonl", b"\n".join(([GOOD_LINE.encode()] if good else []) + raw) + b"\n")


def chat(*messages: object, **extra: object) -> str:
    return json.dumps({"messages": list(messages), **extra})


def turn(role: object, content: object) -> dict:
    return {"role": role, "content": content}


def eval_cases() -> Iterator[tuple]:
    """`lora-run eval`: hostile JSONL lines are skipped with a warning naming the line (line 2: the
    first is a good example) and refused with --strict; hostile files are refused."""
    user, assistant = turn("user", "one two"), turn("assistant", "three")
    bad_lines: dict[str, str | bytes] = {
        "wrong-type-messages": chat().replace("[]", '"hi"'),
        "wrong-type-role": chat(turn(3, "x"), assistant),
        "wrong-type-content": chat(turn("user", {"text": 1}), assistant),
        "wrong-type-content-parts": chat(turn("user", [{"type": "text", "text": 5}]), assistant),
        "wrong-type-alpaca-output": json.dumps({"instruction": "one", "output": ["two"]}),
        "wrong-type-top-level-list": "[1, 2]",
        "wrong-type-top-level-string": '"one two"',
        "null-messages": json.dumps({"messages": None}),
        "message-not-object": chat("user", assistant),
        "deep-nesting": '{"messages": ' + nested(100_000) + "}",
        "deep-nesting-content": chat(turn("user", json.loads(nested(500))), assistant),
        "huge-line": chat(turn("user", "one " * 300_000), assistant),
        "binary": bytes(range(256)) * 8,
        "nul-bytes": b"\x00" * 100,
        "latin1": '{"instruction": "caf\xe9", "output": "x"}'.encode("latin-1"),
        "lone-surrogate": chat(turn("user", "\ud800"), assistant),
        "nan-constant": '{"instruction": NaN, "output": "x"}',
        "truncated-json": GOOD_LINE[:40],
        "roles-out-of-order": chat(assistant, user),
        "no-user-turn": chat(turn("system", "be brief"), assistant),
        "unknown-role": chat(turn("tool", "x"), assistant),
        "empty-messages": chat(),
        "neither-format": json.dumps({"prompt": "one", "completion": "two"}),
    }
    for name, line in bad_lines.items():
        yield accept(f"line-{name}", EVAL, eval_data(line), warns=True)
    for name in ("wrong-type-content", "deep-nesting", "huge-line", "binary", "roles-out-of-order"):
        yield refuse(f"strict-line-{name}", [*EVAL, "--strict"], eval_data(bad_lines[name]), names=("line 2", "--strict"))
    yield refuse("all-lines-bad", EVAL, eval_data(*list(bad_lines.values())[:5], good=False), names=("no examples",))
    # unusual but valid: scored, not refused
    yield accept("duplicated-keys", EVAL, eval_data('{"messages": "x", "messages": ' + chat(user, assistant)[13:]))
    yield accept("empty-content", EVAL, eval_data(chat(turn("user", ""), turn("assistant", ""))))
    yield accept("roles-system-user-assistant-user-assistant", EVAL,
                 eval_data(chat(turn("system", "s"), user, assistant, user, assistant)))
    yield accept("unicode-and-bom", EVAL, eval_data("\ufeff" + chat(turn("user", "日本語 ✓ \u202e"), assistant)))
    yield accept("crlf-and-blank-lines", EVAL, eval_data("", "  ", chat(user, assistant) + "\r"))
    yield accept("extra-fields", EVAL, eval_data(chat(user, assistant, tools=[{"x": 1}], weight=0.5)))
    yield accept("prompt-longer-than-max-tokens", EVAL, eval_data(chat(turn("user", "one " * 40), assistant)),
                 warns=True)
    yield refuse("strict-prompt-longer-than-max-tokens", [*EVAL, "--strict"],
                 eval_data(chat(turn("user", "one " * 40), assistant)), names=("line 2", "--max-tokens 16"))
    yield accept("report", [*EVAL, "--report", "{out}/r.html", "--json"], eval_data(), outputs=("{out}/r.html",))
    # hostile files
    yield refuse("data-missing", [*EVAL[1:], "{out}/none.jsonl"], names=("none.jsonl",))
    yield refuse("data-empty", EVAL, write_raw("input", "data.jsonl", b""), names=("no examples",))
    yield refuse("data-only-blank-lines", EVAL, write_raw("input", "data.jsonl", b"\n \n\t\n"), names=("no examples",))
    yield refuse("data-directory", ["{input}", *EVAL[1:]], names=("DATA",))
    yield refuse("data-fifo", EVAL, both(eval_data(), make_fifo("input", "data.jsonl")), **hang())
    yield refuse("data-dev-zero", EVAL, both(eval_data(), device_link("input", "data.jsonl", "/dev/zero")), **hang())
    yield refuse("data-dev-urandom", EVAL, both(eval_data(), device_link("input", "data.jsonl", "/dev/urandom")), **hang())
    yield refuse("data-huge-file", EVAL, sparse("input", "data.jsonl", (64 << 20) + 1), names=("64 MiB",))
    yield refuse("data-not-utf8", EVAL, write_raw("input", "data.jsonl", "é\n".encode("utf-16") * 10),
                 names=("no examples",))
    yield refuse("model-missing", [*EVAL, "--model", "{out}/none.bin"], eval_data(), names=("none.bin",))
    yield refuse("lora-for-another-base", [*EVAL[:4], "{input}/other.bin", *EVAL[5:]],
                 both(eval_data(), copy_shared("big-lora.bin", "other.bin")), names=("other.bin",))
    yield refuse("lora-as-model", [*EVAL[:2], "{adapter}", *EVAL[3:]], eval_data())
    yield refuse("report-is-data", [*EVAL, "--report", "{input}/data.jsonl"], eval_data(), names=("--report",))
    yield refuse("report-is-directory", [*EVAL, "--report", "{out}"], eval_data(), names=("--report",))
    yield refuse("max-tokens-0", [*EVAL, "--max-tokens", "0"], eval_data(), names=("--max-tokens",))


TABLES = {
    ("convert", "ckpt", "ckpt"): convert_checkpoint_cases,
    ("convert", "header", "ckpt"): convert_header_cases,
    ("convert", "config", "config"): convert_config_cases,
    ("convert", "tokenizer", "config"): convert_tokenizer_cases,
    ("convert", "adapter", "adapter"): convert_adapter_cases,
    ("convert", "flags", "pkg"): convert_flag_cases,
    ("convert", "output", "io"): convert_output_cases,
    ("convert", "process", "io"): convert_process_cases,
    ("bundle", "bundle", "bundle"): bundle_cases,
    ("inspect", "inspect", "bundle"): inspect_cases,
    ("package", "package", "bundle"): package_cases,
    ("run", "run", "run"): lora_run_cases,
    ("eval", "eval", "run"): eval_cases,
}


# Input kinds, output paths, signals, disk and concurrency belong to the io area in every tool.
IO_WORDS = ("fifo", "dev-zero", "dev-urandom", "dev-null", "disk-full", "sigterm", "sighup", "sigint", "sigbus",
            "output-", "-output", "hardlink", "symlink", "concurrent", "is-directory", "too-long", "in-proc")


def cases() -> list[Case]:
    """Every case, in table order."""
    found = []
    for (tool, category, area), table in TABLES.items():
        for name, expect, argv, setup, extra in table():
            extra = {"area": "io" if any(word in name for word in IO_WORDS) else area, **extra}
            found.append(Case(id=f"{tool}.{category}.{name}", argv=argv, expect=expect, setup=setup, **extra))
    ids = [c.id for c in found]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    return found


# --------------------------------------------------------------------------------------------
# lora-run serve: hostile HTTP requests against one running server


@dataclass(frozen=True)
class Request:
    """One hostile request; `expect`: "4xx" (a client error with a JSON message) or "any" (200 or
    that; unusual but valid). Never a 5xx, a hang or a dead server."""

    name: str
    path: str
    body: bytes | None = None
    method: str = "POST"
    expect: str = "4xx"
    headers: tuple[tuple[str, str], ...] = ()


def serve_requests() -> list[Request]:
    def body(value: object) -> bytes:
        return json.dumps(value).encode()

    def tgi(**parameters: object) -> bytes:
        return body({"inputs": "one two three", "parameters": parameters})

    found = []
    for path in ("/generate", "/generate_stream", "/v1/chat/completions"):
        short = path.strip("/").replace("/", "-")
        for name, data in (("empty", b""), ("null", b"null"), ("number", b"1"), ("string", b'"one"'),
                           ("list", b"[]"), ("binary", bytes(range(256))), ("not-utf8", b'{"inputs": "\xff\xfe"}'),
                           ("truncated", b'{"inputs": "one'), ("nan", b'{"inputs": NaN}'),
                           ("deep", b'{"inputs": ' + nested(100_000).encode() + b"}"),
                           ("too-large", b" " * (2 << 20)), ("bom-and-nul", b"\xef\xbb\xbf{\x00}")):
            found.append(Request(f"{short}-{name}", path, data))
    for name, value in (("inputs-number", 1), ("inputs-list", ["one"]), ("inputs-object", {}), ("inputs-empty", ""),
                        ("inputs-surrogate", "\ud800"), ("inputs-huge", "one " * 200_000)):
        found.append(Request(name, "/generate", body({"inputs": value})))
    for key, values in (("parameters", ["x", 1, [], True]),):
        found += [Request(f"{key}-{json.dumps(v)}", "/generate", body({"inputs": "one", key: v})) for v in values]
    for key, values in (
            ("adapter_id", [1, [], {}, True, "", "../../etc/passwd", "base\u0000", "x" * 100_000]),
            ("max_new_tokens", ["1", 1.5, -1, 0, 2**63, True, 1e400, 10**6]),
            ("temperature", ["hot", -0.1, 1e400, [1], {}]),
            ("top_k", [0, -1, 1.5, "1", 2**63]),
            ("seed", [2**64, -(2**64), 1.5, "1"]),
            ("stop", [5, [""], ["a"] * 5, ["x" * 1000], [None], {}])):
        found += [Request(f"{key}-{json.dumps(v)[:20]}", "/generate", tgi(**{key: v})) for v in values]
    found.append(Request("temperature-nan-literal", "/generate", b'{"inputs": "one", "parameters": {"temperature": NaN}}'))
    found.append(Request("temperature-infinity-literal", "/generate",
                         b'{"inputs": "one", "parameters": {"temperature": Infinity}}'))
    found.append(Request("parameters-deep", "/generate", body({"inputs": "one", "parameters": {"stop": json.loads(nested(500))}})))

    def messages(value: object, **extra: object) -> bytes:
        return body({"model": "base", "messages": value, **extra})

    user = {"role": "user", "content": "one two"}
    shapes: tuple[tuple[str, object], ...] = (("null", None), ("string", "hi"), ("empty", []), ("item-null", [None]),
                        ("no-content", [{"role": "user"}]), ("content-number", [{"role": "user", "content": 5}]),
                        ("role-number", [{"role": 1, "content": "x"}]), ("role-tool", [{"role": "tool", "content": "x"}]),
                        ("deep-content", [{"role": "user", "content": json.loads(nested(500))}]))
    found += [Request(f"chat-messages-{name}", "/v1/chat/completions", messages(shape)) for name, shape in shapes]
    models: tuple[tuple[str, object], ...] = (("model-number", 1), ("model-null", None), ("model-unknown", "nope"),
                                              ("model-huge", "x" * 100_000))
    found += [Request(f"chat-{name}", "/v1/chat/completions", body({"model": model, "messages": [user]}))
              for name, model in models]
    found += [Request("chat-max-tokens-string", "/v1/chat/completions", messages([user], max_tokens="8")),
              Request("chat-max-tokens-huge", "/v1/chat/completions", messages([user], max_tokens=10**9))]
    # unusual but valid: answered (200) or refused, never a 5xx
    found += [
        Request("duplicated-keys", "/generate", b'{"inputs": 1, "inputs": "one two"}', expect="any"),
        Request("utf16-body", "/generate", '{"inputs": "one two"}'.encode("utf-16"), expect="any"),
        Request("text-plain", "/generate", body({"inputs": "one"}), expect="any", headers=(("content-type", "text/plain"),)),
        Request("inputs-control-characters", "/generate", body({"inputs": "one\u0000\u202e\ttwo"}), expect="any"),
        Request("unknown-parameters", "/generate", tgi(best_of=9, watermark=True, details=True), expect="any"),
        Request("chat-roles-out-of-order", "/v1/chat/completions",
                messages([{"role": "assistant", "content": "x"}, user]), expect="any"),
        Request("chat-empty-content", "/v1/chat/completions", messages([{"role": "user", "content": ""}]), expect="any"),
        Request("chat-stream-not-boolean", "/v1/chat/completions", messages([user], stream="yes"), expect="any"),
    ]
    found += [Request("get-generate", "/generate", method="GET"), Request("put-chat", "/v1/chat/completions", b"{}", "PUT"),
              Request("delete-health", "/health", method="DELETE"), Request("post-info", "/info", b"{}"),
              Request("unknown-path", "/generate/x", b"{}"), Request("nul-path", "/%00", b"{}")]
    return found


def request_problem(client, url: str, request: Request) -> str | None:
    """What is wrong with the server's answer to one request, or None."""
    import httpx

    try:
        answer = client.request(request.method, url + request.path, content=request.body,
                                headers=dict(request.headers))
    except httpx.HTTPError as exc:
        return f"no answer: {type(exc).__name__}: {exc}"
    status = answer.status_code
    if status >= 500 or (request.expect == "4xx" and not 400 <= status < 500) or status not in range(200, 500):
        return f"status {status}: {answer.text[:200]!r}"
    if status >= 400:
        try:
            error = answer.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"status {status} without a JSON error: {answer.text[:200]!r}"
        message = error["message"] if isinstance(error, dict) else error
        if not isinstance(message, str) or not message or "\n" in message or "Traceback" in message:
            return f"status {status}: not a one-line message: {message!r}"[:300]
    return None


def serve_problems(url: str, requests: list[Request]) -> dict[str, str]:
    """Every request in turn; then the server must still answer /health and a good request."""
    import httpx

    problems = {}
    with httpx.Client(timeout=60) as client:
        for request in requests:
            problem = request_problem(client, url, request)
            if problem:
                problems[request.name] = problem
        after = [client.get(url + "/health"), client.post(url + "/generate", json={"inputs": "one two three"})]
    if [a.status_code for a in after] != [200, 200] or not isinstance(after[1].json().get("generated_text"), str):
        problems["after"] = f"the server stopped answering: {[(a.status_code, a.text[:100]) for a in after]}"
    return problems


@contextlib.contextmanager
def serving(shared: Path) -> Iterator[str]:
    """`lora-run serve` on the shared tiny model and adapter, on a free port; its URL."""
    process = subprocess.Popen([sys.executable, "-m", "harness.cli", "serve", "--model", str(shared / "model.bin"),
                                "--lora", f"tiny={shared / 'adapter.bin'}", "--max-tokens", "16", "--port", "0"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        url = process.stdout.readline().strip() if process.stdout else ""
        if not url.startswith("http://"):
            raise RuntimeError(f"lora-run serve did not start: {process.communicate(timeout=60)[1][-2000:]}")
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


# --------------------------------------------------------------------------------------------
# Shared artifacts: converted files and bundles built once per work folder


def build_shared(work: Path) -> Path:
    """`<work>/shared`: fixture copies, the converted tiny model and adapter, a .task, a .litertlm,
    a 100 MB checkpoint (for signals) and its converted base and LoRA files."""
    shared = work / "shared"
    done = shared / ".complete"
    if done.exists():
        return shared
    if shared.exists():
        shutil.rmtree(shared)
    shared.mkdir(parents=True)
    for name in ("tiny-gemma", "tiny-gemma-lora"):
        shutil.copytree(FIXTURES / name, shared / name)
    tok = str(shared / "tiny-gemma" / "tokenizer.model")
    steps = [
        ("convert", ["--model-type", "GEMMA_2B", "--input-ckpt", str(shared / "tiny-gemma"), "--vocab-model-file", tok,
                     "--output-dir", str(shared), "--output-tflite-file", str(shared / "model.bin"),
                     "--lora-ckpt", str(shared / "tiny-gemma-lora"), "--lora-rank", "8",
                     "--lora-output-tflite-file", str(shared / "adapter.bin"), "--quiet"]),
        ("bundle", ["--tflite-model", str(shared / "model.bin"), "--tokenizer-model", tok, *GEMMA_TOKENS,
                    "--output-filename", str(shared / "model.task")]),
        ("bundle", ["--tflite-model", str(shared / "model.bin"), "--tokenizer-model", tok, *GEMMA_TOKENS,
                    "--output-filename", str(shared / "model.litertlm"), "--format", "litertlm"]),
    ]
    make_big_checkpoint(shared / "big-gemma", shared / "tiny-gemma")
    make_tiny_gemma2(shared / "tiny-gemma2", shared / "tiny-gemma")
    steps.append(("convert", ["--model-type", "GEMMA_2B", "--input-ckpt", str(shared / "big-gemma"),
                              "--vocab-model-file", tok, "--output-dir", str(shared), "--output-tflite-file",
                              str(shared / "big.bin"), "--lora-ckpt", str(shared / "big-lora"), "--lora-rank", "8",
                              "--lora-output-tflite-file", str(shared / "big-lora.bin"), "--quiet"]))
    for tool, argv in steps:
        result = run_tool(tool, argv, shared, 300)
        if result.code != 0:
            raise RuntimeError(f"building the shared inputs failed: {tool} {argv}\n{result.stderr}")
    done.touch()
    return shared


def make_tiny_gemma2(folder: Path, tiny: Path) -> None:
    """The tiny Gemma as a Gemma 2 (soft caps, sliding window, the two extra norms per layer)."""
    import torch
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    shutil.copy(tiny / "tokenizer.model", folder / "tokenizer.model")
    config = json.loads((tiny / "config.json").read_text())
    config.update(model_type="gemma2", architectures=["Gemma2ForCausalLM"], query_pre_attn_scalar=16,
                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
                  cache_implementation="hybrid")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(str(tiny / "model.safetensors"))
    for i in range(config["num_hidden_layers"]):
        for norm in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = torch.zeros(config["hidden_size"])
    save_file(tensors, str(folder / "model.safetensors"))


def make_big_checkpoint(folder: Path, tiny: Path) -> None:
    """A random Gemma with the tiny one's vocabulary but 4 layers of hidden 256 / FFN 8192 (~110 MB
    float32), so a conversion runs long enough to be interrupted; plus a rank-8 adapter for it."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    shutil.copy(tiny / "tokenizer.model", folder / "tokenizer.model")
    config = json.loads((tiny / "config.json").read_text())
    hidden, ffn, layers, heads, head_dim = 256, 8192, 4, 4, 64
    config.update(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=1, head_dim=head_dim)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        shapes.update({
            prefix + "input_layernorm.weight": (hidden,), prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            prefix + "self_attn.k_proj.weight": (head_dim, hidden), prefix + "self_attn.v_proj.weight": (head_dim, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            prefix + "mlp.gate_proj.weight": (ffn, hidden), prefix + "mlp.up_proj.weight": (ffn, hidden),
            prefix + "mlp.down_proj.weight": (hidden, ffn)})
    save_file({name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()},
              str(folder / "model.safetensors"))
    adapter = folder.parent / "big-lora"
    adapter.mkdir()
    lora_config = json.loads((tiny.parent / "tiny-gemma-lora" / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(lora_config))
    tensors = {}
    for name, shape in shapes.items():
        if ".self_attn." in name:
            stem = "base_model.model." + name.removesuffix(".weight")
            tensors[stem + ".lora_A.weight"] = torch.randn(8, shape[1], generator=generator) * 0.02
            tensors[stem + ".lora_B.weight"] = torch.randn(shape[0], 8, generator=generator) * 0.02
    save_file(tensors, str(adapter / "adapter_model.safetensors"))


# --------------------------------------------------------------------------------------------
# Running one tool in a forked child


@dataclass
class Result:
    code: int | None  # None: killed after the timeout
    stdout: str
    stderr: str


_context = None


def context():
    """The forkserver: it imports the three CLIs once; every run is a fork of it."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["converter.cli", "bundler.cli", "harness.cli", "torch", "harness.eval_cli",
                                         "harness.evaluate", "harness.eval_report", "rouge_score.rouge_scorer", "tqdm"])
    return _context


def _child(tool: str, argv: list[str], cwd: str, stdout: str, stderr: str) -> None:
    """Runs in the forked child: the CLI as `python -m` would run it (its own signal dispositions,
    stdout/stderr to files, working folder), exit status from SystemExit."""
    import importlib
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))  # a blow-up fails alone
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", encoding="utf-8", errors="surrogateescape", closefd=False, buffering=1)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)  # noqa: SIM115
    module, name = TOOLS[tool]
    main = getattr(importlib.import_module(module), name)
    try:
        main(args=SUBCOMMANDS.get(tool, []) + argv, prog_name=f"lora-{tool}")  # supervised, as the console script runs
    except SystemExit as exc:  # the status as the tool gave it (see finish)
        Path(stdout).with_name("status").write_text(str(exc.code if isinstance(exc.code, int) else 1))
        raise


def start(tool: str, argv: list[str], cwd: Path, tag: str = "") -> tuple[multiprocessing.Process, Path, Path]:
    logs = Path(tempfile.mkdtemp(prefix="adv-log-"))
    stdout, stderr = logs / f"stdout{tag}", logs / f"stderr{tag}"
    process = context().Process(target=_child, args=(tool, argv, str(cwd), str(stdout), str(stderr)))
    process.start()
    return process, stdout, stderr


def finish(process: multiprocessing.Process, stdout: Path, stderr: Path, deadline: float) -> Result:
    process.join(max(0.0, deadline - time.monotonic()))
    code = process.exitcode
    if process.is_alive():
        process.kill()
        process.join()
        code = None
    elif code == 255 and (stdout.parent / "status").exists():
        # multiprocessing reports 255 when it loses the forkserver's status message; the tool's own is kept
        code = int((stdout.parent / "status").read_text())
    result = Result(code, stdout.read_text(errors="replace") if stdout.exists() else "",
                    stderr.read_text(errors="replace") if stderr.exists() else "")
    shutil.rmtree(stdout.parent, ignore_errors=True)
    return result


def run_tool(tool: str, argv: list[str], cwd: Path, timeout: float) -> Result:
    process, stdout, stderr = start(tool, argv, cwd)
    return finish(process, stdout, stderr, time.monotonic() + timeout)


# --------------------------------------------------------------------------------------------
# Checks


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every regular file (not followed through symlinks) under `folder`."""
    import hashlib

    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            found[str(path.relative_to(folder))] = (hashlib.sha256(path.read_bytes()).digest(), stat.st_mtime_ns)
    return found


def refusal_problem(result: Result, names: tuple[str, ...] = (), signalled: bool = False) -> str | None:
    """What is wrong with a refusal, or None."""
    if result.code is None:
        return "hang: killed after the timeout"
    if "Traceback" in result.stderr or "Traceback" in result.stdout:
        return "traceback:\n" + result.stderr.strip()[-1500:]
    if result.code < 0 and not signalled:
        return f"killed by signal {-result.code}"
    if result.code == 0:
        return "exit 0: accepted"
    if result.code not in (1, 2) and not signalled:
        return f"exit {result.code}, expected 1 or 2"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.code == 2 and any(line.startswith("Usage:") for line in lines):
        errors = [line for line in lines if line.startswith("Error:")]
        if len(errors) != 1:
            return f"usage error without exactly one 'Error:' line: {result.stderr.strip()[-500:]!r}"
        message = errors[0]
    else:
        errors = [line for line in lines if line.startswith("error:")]
        others = [line for line in lines if not line.startswith(("error:", "warning:", "note:"))]
        if len(errors) != 1 or others or lines[-1] != errors[0]:
            return f"expected one final 'error:' line, got: {result.stderr.strip()[-500:]!r}"
        message = errors[0]
    missing = [word for word in names if word.lower() not in message.lower()]
    if missing:
        return f"the error line does not name {missing}: {message!r}"
    return None


def acceptance_problem(result: Result, case: Case, ctx: Ctx) -> str | None:
    if result.code is None:
        return "hang: killed after the timeout"
    if "Traceback" in result.stderr:
        return "traceback:\n" + result.stderr.strip()[-1500:]
    if result.code != 0:
        return f"exit {result.code}: {result.stderr.strip()[-500:]!r}"
    if case.warns and not any(line.startswith("warning:") for line in result.stderr.splitlines()):
        return f"no warning line: {result.stderr.strip()[-300:]!r}"
    for template in case.outputs:
        path = Path(ctx.path(template))
        if not path.is_file() or path.stat().st_size == 0:
            return f"output {path} missing or empty"
    if case.outputs and case.tool == "convert":
        return read_weights(*case.outputs)(ctx)
    return None


def partial_files(ctx: Ctx) -> str | None:
    partial = [str(p) for p in ctx.root.rglob("*") if ".partial" in p.name]
    return f"partial files left: {partial}" if partial else None


def leftovers(ctx: Ctx, before: dict) -> str | None:
    after = snapshot(ctx.out)
    new = sorted(set(after) - set(before))
    if new:
        return f"files left in the output folder: {new}"
    changed = sorted(k for k in before if after.get(k) != before[k])
    return f"pre-existing output files changed: {changed}" if changed else None


def check_case(case: Case, work: Path, keep: bool = False) -> str | None:
    """Run one case in `work/<id>`; the problem found, or None. Raises Skip when it cannot run."""
    shared = build_shared(work)
    root = work / "cases" / case.id.replace("/", "_")
    if root.exists():
        unmount(root / "out")
        shutil.rmtree(root)
    ctx = Ctx(root, shared)
    ctx.mounted = False
    try:
        if case.needs_root and os.geteuid() != 0:
            raise Skip("needs root to mount a small tmpfs")
        if case.setup is not None:
            case.setup(ctx)
        argv = [ctx.path(arg) for arg in case.argv]
        inputs_before = snapshot(ctx.input)
        outputs_before = snapshot(ctx.out)
        problem = execute(case, ctx, argv)
        if problem is None and not case.inputs_change:
            after = snapshot(ctx.input)
            changed = sorted(k for k in inputs_before if inputs_before[k] != after.get(k))
            if changed:
                problem = f"input files changed or removed: {changed}"
        if problem is None:
            problem = partial_files(ctx)
        if problem is None and case.expect == "refuse":
            problem = leftovers(ctx, outputs_before)
        if problem is None and case.check is not None:
            problem = case.check(ctx)
        if problem is None and any(p.name == MARKER for p in root.rglob("*")):
            problem = "an injected command ran"
        return problem
    finally:
        if ctx.mounted:
            unmount(ctx.out)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def execute(case: Case, ctx: Ctx, argv: list[str]) -> str | None:
    """Start the run(s), act on them (signals), judge the results against the expectation."""
    deadline = time.monotonic() + case.timeout
    runs = [start(case.tool, argv, ctx.root, str(i)) for i in range(case.parallel)]
    missed = case.during(ctx, runs[0][0]) if case.during is not None else None
    results = [finish(*run, deadline) for run in runs]
    if missed:
        if results[0].code == 0:
            raise Skip(f"timing: {missed}")
        return f"{missed}; exit {results[0].code}: {results[0].stderr.strip()[-300:]!r}"
    for result in results:
        if case.expect == "refuse":
            problem = refusal_problem(result, case.names, signalled=case.during is not None)
        elif case.expect == "accept" or result.code == 0 or result.code is None:
            problem = acceptance_problem(result, case, ctx)
        else:
            problem = refusal_problem(result)
        if problem is not None:
            return problem
    if case.parallel > 1 and case.expect != "refuse" and all(r.code != 0 for r in results):
        return "no concurrent run succeeded"
    return None


def run_cases(selected: list[Case], work: Path, jobs: int = 2, keep: bool = False) -> Iterator[tuple]:
    """(case, status pass/FAIL/skip, problem, seconds) for each case, `jobs` cases at a time (each
    run is a child process, so threads only wait), in completion order."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    build_shared(work)
    context()

    def one(case: Case) -> tuple:
        started = time.monotonic()
        try:
            problem = check_case(case, work, keep)
            status = "pass" if problem is None else "FAIL"
        except Skip as exc:
            problem, status = str(exc), "skip"
        return case, status, problem, time.monotonic() - started

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in as_completed([pool.submit(one, case) for case in selected]):
            yield future.result()


# --------------------------------------------------------------------------------------------
# Command line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the case ids with their expectation")
    parser.add_argument("--run", action="store_true", help="run the cases and print a table and counts")
    parser.add_argument("--filter", default="", help="only cases whose id contains this (or one of these, comma-separated)")
    parser.add_argument("--work", type=Path, default=None, help="work folder [default: a new temporary folder]")
    parser.add_argument("--keep", action="store_true", help="keep each case's folder")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="cases run at once")
    parser.add_argument("--serve", action="store_true", help="post hostile HTTP requests to a lora-run serve instead")
    args = parser.parse_args()
    if args.serve:
        requests = serve_requests()
        with serving(build_shared(args.work or Path(tempfile.mkdtemp(prefix="adversarial-")))) as url:
            problems = serve_problems(url, requests)
        for name, problem in problems.items():
            print(f"FAIL {name}: {problem}")
        print(f"total: {len(requests)} requests, {len(problems)} problems")
        return 1 if problems else 0
    selected = [c for c in cases() if any(part in c.id for part in args.filter.split(","))]
    if args.list or not args.run:
        for case in selected:
            print(f"{case.id:60} {case.expect:7} {case.area}")
        print(f"{len(selected)} cases")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="adversarial-"))
    counts: Counter = Counter()
    failures = []
    for case, status, problem, seconds in run_cases(selected, work, args.jobs, args.keep):
        counts[(case.tool, case.category, status)] += 1
        detail = " | ".join(line.strip() for line in (problem or "").splitlines()[-2:])[:240]
        print(f"{status:4} {seconds:5.1f}s {case.id:58} {detail}", flush=True)
        if status == "FAIL":
            failures.append((case, problem))
    print()
    print(f"{'tool':8} {'category':10} {'pass':>5} {'fail':>5} {'skip':>5}")
    for tool, category in sorted({(t, c) for t, c, _ in counts}):
        print(f"{tool:8} {category:10} " + " ".join(f"{counts[(tool, category, s)]:5}" for s in ("pass", "FAIL", "skip")))
    totals = Counter(status for (_, _, status), n in counts.items() for _ in range(n))
    print(f"total: {len(selected)} cases, {totals['pass']} passed, {totals['FAIL']} failed, {totals['skip']} skipped")
    by_area: dict[str, list[str]] = {}
    for case, _ in failures:
        by_area.setdefault(case.area, []).append(case.id)
    for area, ids in sorted(by_area.items()):
        print(f"failing [{area}]: {' '.join(ids)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
