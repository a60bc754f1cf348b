"""`lora-convert`: command-line front end of `converter.convert`."""
from __future__ import annotations

import sys

import click

from . import config as options
from . import heap, hub
from .config import ConversionConfig
from .convert import execute
from .detect import infer_model_type, resolve_ckpt_format
from .errors import ConversionError
from .files import check_input
from .supervisor import SupervisedCommand
from .merge import MergedSource
from .models import FAMILIES, model_type_names
from .models.base import ModelFamily, ModelType
from .plan import ConversionPlan, make_plan
from .split import SplittingSource
from .version import version_option


def print_cpu_plan(plan: ConversionPlan) -> None:
    """`--backend cpu --dry-run`: each input tensor and the graph parameter it loads into; the LoRA inputs."""
    from .cpu.graph import parameter_names, planned_slots
    from .cpu.lora import input_shapes

    config = plan.config
    click.echo(f"# {config.output_path}: {plan.family.name} CPU graph, {config.quantization}, prefill "
               f"{config.cpu_prefill_length}, KV cache {config.cpu_kv_cache_size}"
               + (f", LoRA inputs of rank {config.lora_rank}" if plan.lora is not None else ""))
    names = parameter_names(plan)
    for key, item in planned_slots(plan).items():
        shape = "x".join(map(str, item.shape))
        click.echo(f"{item.source or '(zeros)':60} {names[key]:60} {shape:>14} {item.dtype:>9}")
    if plan.lora is not None and config.lora_rank is not None:
        click.echo(f"# {config.lora_output_path}: float32 LoRA inputs")
        for name, (rows, cols) in input_shapes(plan.dims, config.lora_rank).items():
            click.echo(f"{name:60} {rows}x{cols}")


def print_plan(plan: ConversionPlan) -> None:
    """One line per output tensor: input (`+ LoRA` etc. where an adapter is merged into it), output,
    input shape, dtype, encoding, bytes."""
    if plan.config.backend == "cpu":
        print_cpu_plan(plan)
        return
    merged = plan.source.inner if isinstance(plan.source, SplittingSource) else plan.source  # under the splitter
    merges = merged.merges if isinstance(merged, MergedSource) else {}
    if merges:
        click.echo(f"# merging {plan.config.lora_ckpt} into {len(merges)} base tensors; no LoRA file")
    sections = [(plan.config.output_path, plan.base)]
    if plan.lora is not None:
        sections.append((plan.config.lora_output_path, plan.lora))
    for path, items in sections:
        total = sum(item.nbytes for item in items)
        click.echo(f"# {path}: {sum(len(i.outputs) for i in items)} tensors, {total:,} bytes of data")
        click.echo(f"{'input':60} {'output':72} {'shape':>14} {'dtype':>9} {'encoding':>8} {'bytes':>13}")
        for item in items:
            shape = "x".join(map(str, item.shape))
            for spec in item.outputs:
                source = item.source or "(zeros)"
                merge = merges.get((item.source or "").split("[", 1)[0])  # a fused tensor's slice: "name[0:3]"
                if merge is not None:
                    source += f" + {merge.what}"
                click.echo(f"{source:60} {spec.name:72} {shape:>14} {item.dtype:>9} "
                           f"{item.encoding:>8} {spec.nbytes:>13,}")


def print_adapter_check(adapter: str, model_type: str, input_ckpt: str | None, max_adapter_mb: float | None,
                        merge_mode: str | None, backend: str = "gpu") -> None:
    """Validate an adapter against the model type (and base config.json) and print what would be
    written to the LoRA file, or, when merging, which base tensors change and how."""
    from pathlib import Path

    from .adapter import load_adapter
    from .models import find_model_type
    from .plan import check_lora_supported, resolve_dims, runtime_rank

    check_input(adapter, "--check-adapter", folder=True)
    if input_ckpt:
        check_input(input_ckpt, "--input-ckpt", folder=True)
    from .cpu import rules as cpu_rules

    family, kind = find_model_type(model_type)
    cpu = backend == "cpu"
    if cpu and family.cpu is None:
        raise ConversionError(f"--backend cpu is not supported for {kind.name}: litert-torch builds no CPU graph "
                              f"for the {family.name} family here; use --backend gpu")
    if merge_mode is None:
        (cpu_rules.check_supported if cpu else check_lora_supported)(family, kind)
    dims, base_config = resolve_dims(family, kind, Path(input_ckpt)) if input_ckpt else (kind.reference, {})
    loaded = load_adapter(adapter, family, dims, kind.name, max_adapter_mb, merge_mode, base_config)
    loaded.source.close()
    for note in loaded.notes:
        click.echo(f"warning: {note}", err=True)
    if merge_mode is not None:
        click.echo(f"{adapter}: merged into {len(loaded.merges)} base tensors of {kind.name} ({dims.describe()}); "
                   f"no LoRA file")
        for merge in loaded.merges:
            how = f"rank {merge.rank}, scale {merge.scale:g}" if merge.a_key else "whole tensor"
            click.echo(f"{merge.target:40} <- {merge.what} ({how})")
        return
    if cpu:
        cpu_rules.check_targets(family, {pair.module for pair in loaded.pairs if pair.a_key})
        file_rank = next((r for r in cpu_rules.RANKS if r >= loaded.rank), None)
        if file_rank is None:
            raise ConversionError(f"the adapter's rank {loaded.rank} ({adapter}) is above {cpu_rules.RANKS[-1]}, the "
                                  "largest LoRA rank --backend cpu takes; merge it with --merge-lora")
    else:
        file_rank = runtime_rank(loaded.rank)
    click.echo(f"{adapter}: rank {loaded.rank} (LoRA file rank {file_rank} unless --lora-rank says "
               f"otherwise), {len(loaded.pairs)} LoRA modules for {kind.name} ({dims.describe()})")
    projections = dict(zip(family.required_lora, "qkvo"))
    for pair in loaded.pairs:
        rule = family.lora_rule(pair.module)
        if cpu:
            target = f"lora_atten_{projections[pair.module]}_{{a,b}}_prime_weight_{pair.layer}"
        else:
            target = f"{family.mp_layer_prefix.format(i=pair.layer) + rule.mp}.{{{rule.a_name},{rule.b_name}}}"
        what = f"rank {pair.rank}, scale {pair.scale:g}" if pair.a_key else "missing: written as zeros"
        click.echo(f"layer {pair.layer:3} {pair.module:18} -> {target}  {what}")


def lora_targets(family: ModelFamily, model_type: ModelType) -> str:
    """The adapter modules a model type takes: required ones, then optional ones in parentheses."""
    if not family.lora or not model_type.lora:
        return "none (MediaPipe takes no LoRA for it)"
    short = [rule.hf_module.rsplit(".", 1)[-1] for rule in family.lora]
    required = [name for rule, name in zip(family.lora, short) if rule.hf_module in family.required_lora]
    optional = [name for name in short if name not in required]
    return " ".join(required) + (f" (+ {' '.join(optional)})" if optional else "")


def print_models(ctx: click.Context, _option, value: bool) -> None:
    """`--list-models`: every supported model type with what it supports, from the family data."""
    if not value or ctx.resilient_parsing:
        return
    rows = [("model type", "family", "config model_type", "LoRA targets (+ optional)", "quantizations", "backends")]
    for family in FAMILIES:
        for model_type in family.model_types:
            rows.append((model_type.name, family.name, ",".join(family.hf_model_types),
                         lora_targets(family, model_type), ",".join(family.quantizations), ",".join(family.backends)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    ctx.exit()


def resolve_inputs(kwargs: dict, check_adapter: str | None, quiet: bool) -> str | None:
    """Fill in, in place, what the files imply: hub ids become local snapshot folders, `--ckpt-format`
    is detected and `--model-type` inferred from config.json when not given; returns the adapter to check."""
    def local(option: str, given: str | None, path: str | None) -> str | None:
        if path != given and not quiet:
            click.echo(f"note: {option} {given} is {path}", err=True)
        return path

    kwargs["input_ckpt"] = local("--input-ckpt", kwargs["input_ckpt"],
                                 hub.checkpoint_path(kwargs["input_ckpt"], kwargs["ckpt_format"]))
    kwargs["lora_ckpt"] = local("--lora-ckpt", kwargs["lora_ckpt"], hub.adapter_path(kwargs["lora_ckpt"]))
    check_adapter = local("--check-adapter", check_adapter, hub.adapter_path(check_adapter, "--check-adapter"))
    checkpoint = kwargs["input_ckpt"]
    kwargs["ckpt_format"] = resolve_ckpt_format(checkpoint, kwargs["ckpt_format"]) if checkpoint else "safetensors"
    if kwargs["model_type"] is None:
        if not checkpoint:
            raise click.UsageError("Missing option '--model-type' (or --input-ckpt, to infer it from its config.json)")
        kwargs["model_type"] = infer_model_type(checkpoint)
        if not quiet:
            click.echo(f"note: --model-type {kwargs['model_type']} (inferred from config.json)", err=True)
    return check_adapter


@click.command(cls=SupervisedCommand, context_settings={"help_option_names": ["-h", "--help"]})
@version_option("lora-convert")
@click.option("--list-models", is_flag=True, expose_value=False, is_eager=True, callback=print_models,
              help="List the supported model types with their LoRA targets, quantizations and backends, and exit.")
@click.option("--input-ckpt", default=None,
              help="Base checkpoint: file, folder (sharded too), glob, or Hugging Face hub id OWNER/NAME[@REVISION].")
@click.option("--ckpt-format", type=click.Choice(options.CKPT_FORMATS), default=None,
              help="Checkpoint file format [default: detected from the files].")
@click.option("--model-type", default=None, metavar="TYPE",
              help=f"One of: {', '.join(model_type_names())} [default: inferred from config.json when unambiguous].")
@click.option("--backend", type=click.Choice(options.BACKENDS), default="gpu", show_default=True)
@click.option("--output-dir", default=None, help="Output folder (created if missing).")
@click.option("--output-tflite-file", default=None, help="Base weights file [default: OUTPUT_DIR/model.tflite].")
@click.option("--vocab-model-file", default=None,
              help="Tokenizer of the base model: SentencePiece tokenizer.model or a Hugging Face tokenizer folder.")
@click.option("--lora-ckpt", default=None,
              help="LoRA adapter: PEFT folder, .safetensors/.bin file or Hugging Face hub id OWNER/NAME[@REVISION].")
@click.option("--lora-rank", type=int, default=None,
              help="Rank the runtime is told: a multiple of 4, at least the adapter's rank [default: the adapter's "
                   "rank rounded up to a multiple of 4].")
@click.option("--lora-output-tflite-file", default=None, help="LoRA weights file [default: OUTPUT_DIR/lora.tflite].")
@click.option("--quantization", type=click.Choice(options.QUANTIZATIONS), default="int8", show_default=True,
              help="Encoding of the base weight matrices. --backend cpu: int8 weights are streamed into a cached "
                   "graph (little memory at any size); int4, fp16 and fp32 graphs are exported whole by litert-torch "
                   "(its memory: several times the float32 model).")
@click.option("--lora-scaling", type=click.Choice(options.LORA_SCALINGS), default=None,
              help="peft: fold lora_alpha/r into the weights (default); raw: store tensors as trained.")
@click.option("--mediapipe-compat", is_flag=True,
              help="Reproduce MediaPipe 0.10.21's bytes exactly, including its o_proj LoRA encoding that the "
                   "runtime mis-applies, and raw LoRA scaling.")
@click.option("--max-rank", type=int, default=options.MAX_LORA_RANK, show_default=True,
              help="Refuse a --lora-rank above this.")
@click.option("--max-adapter-mb", type=float, default=None, help="Refuse adapter files larger than this.")
@click.option("--check-adapter", default=None, metavar="ADAPTER",
              help="Only validate this adapter against --model-type (and --input-ckpt's config.json) and "
                   "print what would be written.")
@click.option("--merge-lora", is_flag=True,
              help="Fold the adapter into the base weights (PEFT's merge_and_unload, per tensor in float32) and "
                   "write one base file, no LoRA file.")
@click.option("--merge-unsupported", is_flag=True,
              help="With --merge-lora: also merge what the runtime cannot take as LoRA (DoRA, embedding LoRA, "
                   "modules_to_save tensors, targets outside the runtime's LoRA set).")
@click.option("--kv-cache-size", type=int, default=None,
              help=f"--backend cpu: positions of the graph's KV cache, prompt and output together "
                   f"[default: {options.DEFAULT_KV_CACHE_SIZE}].")
@click.option("--prefill-length", type=int, default=None,
              help=f"--backend cpu: prompt tokens per prefill step [default: {options.DEFAULT_PREFILL_LENGTH}, "
                   f"at most --kv-cache-size].")
@click.option("--no-graph-cache", "graph_cache", is_flag=True, default=True, flag_value=False,
              help="--backend cpu, int8: build the graph with litert-torch even when one built for this shape and "
                   "base model is cached (in $XDG_CACHE_HOME/lora-convert/cpu-graphs), and do not cache it.")
@click.option("--dry-run", is_flag=True, help="Print the tensor plan and write nothing.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
def main(dry_run: bool, quiet: bool, check_adapter: str | None, **kwargs) -> None:
    """Convert a Hugging Face checkpoint (+ LoRA adapter) to MediaPipe GPU weight files."""
    missing = [f"--{k.replace('_', '-')}" for k in ("input_ckpt", "output_dir", "vocab_model_file") if not kwargs[k]]
    if missing and not check_adapter:
        raise click.UsageError(f"Missing option(s) {', '.join(missing)}")
    try:
        check_adapter = resolve_inputs(kwargs, check_adapter, quiet)
    except ConversionError as exc:
        fail(exc)
    if check_adapter:
        try:
            print_adapter_check(check_adapter, kwargs["model_type"], kwargs["input_ckpt"], kwargs["max_adapter_mb"],
                                options.merge_mode(kwargs["merge_lora"], kwargs["merge_unsupported"]),
                                kwargs["backend"])
        except ConversionError as exc:
            fail(exc)
        return
    try:
        plan = make_plan(ConversionConfig(**kwargs))
    except ConversionError as exc:
        fail(exc)
    try:
        for line in plan.notes:  # the checkpoint's own special tokens
            if not (quiet and line.startswith("note:")):
                click.echo(line, err=True)
        for note in plan.adapter.notes if plan.adapter is not None else ():
            click.echo(f"warning: {note}", err=True)
        if plan.lora is not None and not quiet:
            default = kwargs["lora_rank"] is None
            if plan.config.lora_rank > plan.adapter.rank:
                rule = ("the smallest CPU rank, 16 or 32, that holds it" if plan.config.backend == "cpu"
                        else "the adapter's rank rounded up to a multiple of 4")
                why = f" (--lora-rank not given: {rule})" if default else ""
                click.echo(f"note: zero-padding the rank-{plan.adapter.rank} adapter to rank "
                           f"{plan.config.lora_rank}{why}", err=True)
            elif default:
                click.echo(f"note: --lora-rank not given, using the adapter's rank {plan.config.lora_rank}", err=True)
        if dry_run:
            print_plan(plan)
            return
        total = sum(item.nbytes for item in plan.base + (plan.lora or []))
        heap.unmap_big_buffers_on_free()
        with progress_bar(total, quiet) as bar:
            result = execute(plan, bar.update)
    except ConversionError as exc:
        fail(exc)
    finally:
        plan.close()
    if not quiet:
        click.echo(f"wrote {result.output}" + (f" and {result.lora_output}" if result.lora_output else ""), err=True)


def progress_bar(total: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=True if quiet else None,
                file=sys.stderr, leave=False)


def fail(exc: ConversionError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
