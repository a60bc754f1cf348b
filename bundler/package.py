"""What an app developer drops into an Android or iOS project: model, LoRA files, manifest.

Android: a Play Asset Delivery asset-pack module (`build.gradle` with the
`com.android.asset-pack` plugin, files under `src/main/assets/`) plus an `adb push` script for
the `/data/local/tmp/llm/` side-load path MediaPipe's docs use. iOS: a folder to add as bundle
resources (or tag for On-Demand Resources) with a property-list manifest. Both get
`manifest.json`: every file's name, size and sha256, the model type, LoRA ranks, and the
LLM Inference options to use.
"""
from __future__ import annotations

import json
import math
import plistlib
import re
import shlex
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from converter.config import MAX_LORA_RANK
from converter.errors import ConversionError
from converter.runtime_options import DEFAULTS, RuntimeOptions
from converter.files import atomic_output, regular_file
from converter.tflite import WeightFile

from .graph import CpuGraphInfo, read_cpu_graph
from .inspect import describe_weights, sha256
from .litertlm import model_section
from .output import MANIFEST, check_distinct, check_file_name, check_output_folder, staged_folder
from .task import file_kind, open_weights

PLATFORMS = ("android", "ios")
DELIVERY_TYPES = ("install-time", "fast-follow", "on-demand")
SIDELOAD_DIR = "/data/local/tmp/llm"
MB = 1 << 20
GB = 1 << 30
# Store limits we warn about (Google Play asset packs, App Store / On-Demand Resources).
ANDROID_PACK_LIMITS = {"install-time": 1 * GB, "fast-follow": 512 * MB, "on-demand": 512 * MB}
IOS_ODR_TAG_LIMIT = 512 * MB
IOS_APP_LIMIT = 4 * GB
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
NAME_RULE = "use up to 64 letters, digits and _, starting with a letter"


def parse_lora(value: str) -> tuple[str, Path]:
    """`NAME=PATH` or `PATH` (named after the file)."""
    name, separator, path = value.partition("=")
    if not separator:
        path = value
        name = Path(value).stem.replace("-", "_").replace(".", "_")
    return name, Path(path)


@dataclass(frozen=True)
class PackagedFile:
    name: str
    size: int
    sha256: str
    role: str  # "model" or "lora"


@dataclass(frozen=True)
class PackageResult:
    folder: Path
    files: list[PackagedFile]
    warnings: list[str]


def check_adapter(base: WeightFile, base_path: Path, name: str, path: Path) -> WeightFile:
    """A LoRA file converted for this base: same model type, dimensions and vocabulary."""
    regular_file(path, "--lora")
    kind = file_kind(path)
    if kind != "weights":
        raise ConversionError(f"--lora {path} is a .{kind} bundle, not a LoRA weights file")
    lora = WeightFile(path)
    if lora.lora_rank is None:
        raise ConversionError(f"--lora {path} is not a LoRA weights file (no lora_rank metadata)")
    if lora.subgraph_name != base.subgraph_name:
        raise ConversionError(f"--lora {path} was converted for {lora.subgraph_name}, the base {base_path} is "
                              f"{base.subgraph_name}")
    ours, theirs = base.parameters, lora.parameters
    if ours.transformer_parameters != theirs.transformer_parameters or ours.vocab_size != theirs.vocab_size:
        raise ConversionError(f"--lora {path} was converted for a model with other dimensions than {base_path}")
    if lora.lora_rank > MAX_LORA_RANK or lora.lora_rank % 4:
        raise ConversionError(f"--lora {path} has rank {lora.lora_rank}; expected a multiple of 4 up to {MAX_LORA_RANK}")
    if not NAME.fullmatch(name):
        raise ConversionError(f"--lora name {name!r} (of {path}): {NAME_RULE}; give NAME=PATH to choose one")
    return lora


def check_cpu_adapter(graph: CpuGraphInfo, base_path: Path, name: str, path: Path) -> WeightFile:
    """A LoRA file for this CPU graph: its rank, and tensors named and sized as the graph's LoRA inputs."""
    regular_file(path, "--lora")
    if file_kind(path) != "weights":
        raise ConversionError(f"--lora {path} is a bundle, not a LoRA weights file")
    lora = WeightFile(path)
    if lora.lora_rank is None:
        raise ConversionError(f"--lora {path} is not a LoRA weights file (no lora_rank metadata)")
    if graph.lora_rank is None:
        raise ConversionError(f"--lora {path}: the CPU graph in {base_path} has no LoRA inputs (convert the base "
                              "with --lora-ckpt, or merge the adapter)")
    if lora.lora_rank != graph.lora_rank:
        raise ConversionError(f"--lora {path} has rank {lora.lora_rank}; the CPU graph in {base_path} takes rank "
                              f"{graph.lora_rank}")
    for tensor, entry in lora.tensors.items():
        shape = graph.lora_inputs.get(tensor)
        if shape is None or entry.nbytes != 4 * math.prod(shape):
            raise ConversionError(f"--lora {path}: tensor {tensor} is not a LoRA input of the CPU graph in "
                                  f"{base_path} (or has another size): was it converted for this base?")
    if not NAME.fullmatch(name):
        raise ConversionError(f"--lora name {name!r} (of {path}): {NAME_RULE}; give NAME=PATH to choose one")
    return lora


def cpu_targets(lora: WeightFile) -> list[str]:
    """The projections a CPU LoRA file adapts (q, k, v, o), from its tensor names."""
    return sorted({name.split("_")[2] for name in lora.tensors if name.startswith("lora_atten_")})


def copy_file(source: Path, destination: Path) -> None:
    with open(source, "rb") as src, atomic_output(destination) as dst:
        shutil.copyfileobj(src, dst, 16 * MB)


def size_warnings(platform: str, delivery: str, files: list[PackagedFile]) -> list[str]:
    total = sum(f.size for f in files)
    warnings = []
    if platform == "android":
        limit = ANDROID_PACK_LIMITS[delivery]
        if total > limit:
            warnings.append(f"the asset pack holds {total / MB:,.0f} MB; Google Play accepts at most "
                            f"{limit / MB:,.0f} MB for a {delivery} pack: download the model at run time "
                            "(or side-load it with adb_push.sh for testing)")
    else:
        biggest = max(files, key=lambda f: f.size)
        if biggest.size > IOS_ODR_TAG_LIMIT:
            warnings.append(f"{biggest.name} is {biggest.size / MB:,.0f} MB; an On-Demand Resources tag holds at most "
                            f"{IOS_ODR_TAG_LIMIT / MB:,.0f} MB, so ship it as a bundle resource or download it")
        if total > IOS_APP_LIMIT:
            warnings.append(f"the files total {total / MB:,.0f} MB, beyond the App Store's {IOS_APP_LIMIT / GB:.0f} GB "
                            "app size: download the model at run time")
    return warnings


def package(model: Path, loras: list[tuple[str, Path]], platform: str, output: Path, pack_name: str = "llm",
            delivery: str = "install-time", options: RuntimeOptions = DEFAULTS) -> PackageResult:
    """Check the model (a .task or .bin for the GPU, a .litertlm of a CPU graph) and adapters, lay them
    out for the platform with the manifests in a folder beside `output`, then rename it to `output`
    (see bundler/output.py)."""
    if platform not in PLATFORMS:
        raise ConversionError(f"--platform {platform!r}: expected one of {', '.join(PLATFORMS)}")
    if delivery not in DELIVERY_TYPES:
        raise ConversionError(f"--delivery {delivery!r}: expected one of {', '.join(DELIVERY_TYPES)}")
    if not NAME.fullmatch(pack_name):
        raise ConversionError(f"--pack-name {pack_name!r}: {NAME_RULE}")
    names = [name for name, _ in loras]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConversionError(f"--lora names must be unique; repeated: {', '.join(duplicates)}")
    regular_file(model, "MODEL")
    if file_kind(model) == "litertlm":
        model_info, adapters = _cpu_model(model, loras)
    else:
        base, task = open_weights(model, "MODEL")
        if base.lora_rank is not None:
            raise ConversionError(f"{model} is a LoRA weights file; give the base model first")
        adapters = [(name, path, check_adapter(base, model, name, path)) for name, path in loras]
        description = describe_weights(base)
        model_info = {"format": "task" if task is not None else "weights", "model_type": description["model_type"],
                      "vocab_size": description["parameters"].get("vocab_size")}
    named = [("MODEL", model)] + [("--lora", path) for _, path in loras]
    for option, path in named:
        check_file_name(path, option)
    check_distinct(named, [MANIFEST] + ([f"{pack_name}.plist"] if platform == "ios" else []))
    target = check_output_folder(output, named)

    files = [PackagedFile(model.name, model.stat().st_size, sha256(model), "model")]
    files += [PackagedFile(path.name, path.stat().st_size, sha256(path), "lora") for _, path, _ in adapters]
    cpu = model_info["format"] == "litertlm"
    manifest = {
        "format_version": 1,
        "platform": platform,
        "pack_name": pack_name,
        "model": {"file": model.name, **model_info},
        "adapters": [{"name": name, "file": path.name, "lora_rank": lora.lora_rank,
                      "targets": cpu_targets(lora) if cpu else describe_weights(lora)["lora_targets"]}
                     for name, path, lora in adapters],
        "files": [asdict(f) for f in files],
        "runtime_options": {**options.as_mediapipe(), "loraRanks": sorted({lora.lora_rank for _, _, lora in adapters})},
    }
    if platform == "android":
        manifest["delivery"] = delivery
        manifest["sideload_paths"] = {f.name: f"{SIDELOAD_DIR}/{f.name}" for f in files}
    manifest_text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
    with staged_folder(target) as stage:
        folder = stage / pack_name if platform == "ios" else stage / pack_name / "src" / "main" / "assets"
        for source in [model] + [path for _, path, _ in adapters]:
            copy_file(source, folder / source.name)
        if platform == "android":
            write_android(stage, pack_name, delivery, files)
        else:
            write_ios(folder, pack_name, manifest)
        with atomic_output(folder / MANIFEST) as handle:
            handle.write(manifest_text.encode())
    return PackageResult(output, files, size_warnings(platform, delivery, files))


def _cpu_model(model: Path, loras: list[tuple[str, Path]]) -> tuple[dict, list[tuple[str, Path, WeightFile]]]:
    """A .litertlm holding a CPU graph (`lora-convert --backend cpu`) and its adapters, checked."""
    model_type, begin, end = model_section(model)
    if model_type != "tf_lite_prefill_decode":
        raise ConversionError(f"MODEL {model} is a .litertlm bundle of GPU weights ({model_type}); package the .task or "
                              ".bin for the GPU, or a .litertlm of a CPU graph (lora-convert --backend cpu)")
    graph = read_cpu_graph(model, begin, end - begin)
    adapters = [(name, path, check_cpu_adapter(graph, model, name, path)) for name, path in loras]
    # The container names no MediaPipe model type; its section type says what it is.
    return {"format": "litertlm", "backend": "cpu", "model_type": model_type, "vocab_size": graph.vocab_size}, adapters


def write_android(output: Path, pack_name: str, delivery: str, files: list[PackagedFile]) -> None:
    gradle = (
        "plugins {\n    id 'com.android.asset-pack'\n}\n\n"
        f"assetPack {{\n    packName = \"{pack_name}\"\n    dynamicDelivery {{\n"
        f"        deliveryType = \"{delivery}\"\n    }}\n}}\n"
    )
    with atomic_output(output / pack_name / "build.gradle") as handle:
        handle.write(gradle.encode())
    assets = f"{pack_name}/src/main/assets"
    push = ["#!/bin/sh", "# Side-load for testing (MediaPipe's documented path).", "set -e",
            'cd -- "$(dirname -- "$0")"',
            f"adb shell mkdir -p {shlex.quote(SIDELOAD_DIR)}"]
    push += [f"adb push {shlex.quote(f'{assets}/{f.name}')} {shlex.quote(f'{SIDELOAD_DIR}/{f.name}')}" for f in files]
    with atomic_output(output / "adb_push.sh") as handle:
        handle.write(("\n".join(push) + "\n").encode())
    (output / "adb_push.sh").chmod(0o755)
    with atomic_output(output / "README.md") as handle:
        handle.write(
            f"Add the asset pack to your app: in settings.gradle `include ':{pack_name}'`, in the app module's "
            f"build.gradle `assetPacks = [\":{pack_name}\"]`. Files and runtime options: "
            f"{assets}/manifest.json.\n".encode())


def write_ios(folder: Path, pack_name: str, manifest: dict) -> None:
    plist = {
        "LLMPackName": pack_name,
        "LLMModelFile": manifest["model"]["file"],
        "LLMModelType": manifest["model"]["model_type"],
        "LLMOnDemandResourceTag": pack_name,
        "LLMAdapters": [{"Name": a["name"], "File": a["file"], "LoraRank": a["lora_rank"]} for a in manifest["adapters"]],
        "LLMFiles": [{"Name": f["name"], "Size": f["size"], "SHA256": f["sha256"]} for f in manifest["files"]],
        "LLMRuntimeOptions": manifest["runtime_options"],
    }
    with atomic_output(folder / f"{pack_name}.plist") as handle:
        plistlib.dump(plist, handle, sort_keys=True)

