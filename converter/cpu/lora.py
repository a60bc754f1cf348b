"""LoRA on the CPU graph: which modules and ranks it takes, and the LoRA weights file LiteRT-LM loads.

litert-torch applies LoRA to the attention projections q, k, v and o (the family's
`required_lora`, in that order) as `x @ A' @ B'` with `A' = A.T` (`[in, rank]`) and
`B' = scale * B.T` (`[rank, out]`), signature inputs named `lora_atten_<q|k|v|o>_<a|b>_prime_weight_<layer>`.
LiteRT-LM copies each such input from the tensor of the same name in the LoRA file, by byte size
(a missing one is zeros, a different size is an error), reading `offset`/`size` buffers: the layout
converter/tflite.py writes for GPU weights files, so the same writer is used.
"""
from __future__ import annotations

import torch

from .. import tflite
from ..convert import lora_half
from ..models.base import Dims
from ..plan import ConversionPlan

PROJECTIONS = "qkvo"
SUBGRAPH = "lora_params"


def input_name(projection: str, half: str, layer: int) -> str:
    return f"lora_atten_{projection}_{half}_prime_weight_{layer}"


def input_shapes(dims: Dims, rank: int) -> dict[str, tuple[int, int]]:
    """Every LoRA input of the graph with its shape, layer by layer, q k v o, A' then B'."""
    sizes = {"q": (dims.hidden_size, dims.q_size), "k": (dims.hidden_size, dims.kv_size),
             "v": (dims.hidden_size, dims.kv_size), "o": (dims.q_size, dims.hidden_size)}
    return {input_name(p, half, layer): shape
            for layer in range(dims.num_layers) for p in PROJECTIONS
            for half, shape in (("a", (sizes[p][0], rank)), ("b", (rank, sizes[p][1])))}


def lora_tensors(plan: ConversionPlan) -> dict[str, torch.Tensor]:
    """The LoRA signature inputs' values, by name: A' and B' (PEFT's scale folded into B'); zeros
    for projections the adapter leaves out."""
    assert plan.adapter is not None and plan.lora is not None and plan.config.lora_rank is not None
    projection = dict(zip(plan.family.required_lora, PROJECTIONS))
    tensors = {name: torch.zeros(shape) for name, shape in input_shapes(plan.dims, plan.config.lora_rank).items()}
    halves = iter(plan.lora)
    for pair in plan.adapter.pairs:
        a, b = lora_half(plan, next(halves)), lora_half(plan, next(halves))
        tensors[input_name(projection[pair.module], "a", pair.layer)] = a.t().contiguous()
        tensors[input_name(projection[pair.module], "b", pair.layer)] = b.t().contiguous()
    return tensors


def write_lora_file(plan: ConversionPlan, tensors: dict[str, torch.Tensor]) -> int:
    """Write the LoRA weights file (float32 tensors, rank metadata); returns its size."""
    path = plan.config.lora_output_path
    assert path is not None and plan.config.lora_rank is not None
    specs = [tflite.TensorSpec(name, tflite.FLOAT32, t.numel() * 4) for name, t in tensors.items()]
    with tflite.WeightFileWriter(path, SUBGRAPH, specs, [(tflite.LORA_RANK, plan.config.lora_rank)]) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor.numpy())
    return writer.layout.file_size
