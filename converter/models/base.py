"""The vocabulary a model family file uses to describe itself as data."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ..errors import ConversionError
from ..proto import llm_params_pb2
from .values import integer, mapping, number


class Role(enum.Enum):
    """What a base tensor is; decides its encoding (quantized or raw float32)."""

    EMBEDDING = "embedding"
    ATTENTION = "attention"
    FEEDFORWARD = "feedforward"
    NORM = "norm"
    BIAS = "bias"

    @property
    def quantized(self) -> bool:
        return self in (Role.EMBEDDING, Role.ATTENTION, Role.FEEDFORWARD)


@dataclass(frozen=True)
class Dims:
    """The hyperparameters that decide tensor shapes, read from config.json."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    def shape(self, names: tuple[str, ...]) -> tuple[int, ...]:
        """Evaluate a symbolic shape such as ("q_size", "hidden_size")."""
        return tuple(getattr(self, name) for name in names)

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


@dataclass(frozen=True)
class Split:
    """Where one output tensor lies in a fused checkpoint tensor (e.g. Falcon's query_key_value).

    The fused rows are read as `[-1, parts, block]`; this output takes index `part` of the middle
    axis, so `block` rows at a time from every group of `parts * block` rows.
    """

    part: int
    parts: int
    block: str = "head_dim"


@dataclass(frozen=True)
class WeightRule:
    """One base tensor: its Hugging Face name, MediaPipe name, role and symbolic shape.

    Names may contain `{i}` for the layer index. `lookup_order` marks the embedding that the
    runtime looks up first: its tensors are stored as `w, w.sum_i, w_quantized_scale`
    instead of `w_quantized_scale, w, w.sum_i`. `slot` is the part the tensor plays in the
    forward pass (see `SLOTS`), which is how the reference runtime finds it. `shape` is the
    checkpoint tensor's shape; with `split` the output is its `split.part` slice. `tied` names
    the tensor to read when `hf` is absent (a tied output projection reads the embedding).
    """

    hf: str
    mp: str
    role: Role
    shape: tuple[str, ...]
    lookup_order: bool = False
    slot: str = ""
    split: Split | None = None
    tied: str | None = None

    def output_shape(self, dims: Dims) -> tuple[int, ...]:
        """The shape of the tensor written: the checkpoint's, or its slice's with `split`."""
        shape = dims.shape(self.shape)
        return shape if self.split is None else (shape[0] // self.split.parts, *shape[1:])


# The parts a tensor can play in the forward pass (`WeightRule.slot`); a bias adds ".bias"
# to its weight's slot (e.g. "q.bias", "attn_norm.bias").
MODEL_SLOTS = ("embedding", "lm_head", "final_norm")
LAYER_SLOTS = (
    "attn_norm",       # normalizes the attention input (TransformerParameters.pre_norm)
    "q", "k", "v", "o",
    "q_norm", "k_norm",  # per-head norms of queries and keys (SelfAttentionParameters.qk_norm)
    "attn_post_norm",  # normalizes the attention output before the residual add (post_norm)
    "mlp_norm",        # normalizes the MLP input (FeedForwardParameters.pre_norm)
    "gate", "up", "down",  # MLP: down(act(gate(x)) * up(x)), or down(act(up(x))) when not gated
    "mlp_post_norm",   # normalizes the MLP output before the residual add (FeedForwardParameters.post_norm)
)


@dataclass(frozen=True)
class Architecture:
    """The forward-pass facts of a family that LlmParameters does not carry.

    MediaPipe's runtime knows these from the model type; LlmParameters carries the per-model
    choices (norm kinds, activation, soft caps, attention scale, QK norm, sliding window,
    local/global layer pattern, global rotary base and scaling), and the tensors present decide
    biases and tied embeddings (no `lm_head` slot: the embedding is the output projection).
    """

    norm_eps: float = 1e-6
    norm_offset: float = 0.0  # RMSNorm scale is (norm_offset + w): Gemma stores w and applies 1 + w
    scale_embedding: bool = False  # embeddings are multiplied by sqrt(hidden_size) (Gemma)
    gelu_approximate: str = "tanh"  # the GELU flavour: "tanh" (gelu_pytorch_tanh, gelu_new) or "none" (erf)
    gated_mlp: bool = True  # down(act(gate(x)) * up(x)); False: down(act(up(x)))
    parallel_residual: bool = False  # h + attention(x) + mlp(x) from one normalized x (Phi-2)
    position: str = "rope"  # "rope" (rotate-half rotary embedding) or "alibi" (linear biases, no rotary)
    rope_theta: float = 10000.0  # rotary base; of the local layers where LlmParameters sets a global one
    rotary_fraction: float = 1.0  # share of head_dim that is rotated (partial rotary: Phi-2 0.4, StableLM 0.25)
    free_head_dim: bool = False  # head_dim may differ from hidden_size / heads (Gemma); else it must not


@dataclass(frozen=True)
class LoraRule:
    """A LoRA target: PEFT module name, MediaPipe prefix and which name each half gets.

    `transposed_in_mediapipe` marks the target that MediaPipe 0.10.21 encoded as a reshape of
    the transposed matrices (o_proj). `swapped_in_mediapipe` marks one whose halves MediaPipe
    names the other way round (Phi-2's post: PhiMapper's Gemma-style names put A under `b_name`),
    so its C++ step reads each buffer as the other half's shape: reshaped, then transposed back.
    Only `--mediapipe-compat` reproduces these.
    """

    hf_module: str
    mp: str
    a_name: str
    b_name: str
    in_features: str
    out_features: str
    transposed_in_mediapipe: bool = False
    swapped_in_mediapipe: bool = False


@dataclass(frozen=True)
class CpuGraph:
    """How litert-torch builds the family's CPU graph (`--backend cpu`, see converter/cpu/).

    `example` is a module under `litert_torch.generative.examples`, `config` its function that
    returns the real model's `ModelConfig` (converter/cpu/graph.py resizes it to config.json's
    sizes) and `model` its model class. `params` names the litert-torch parameter each slot
    (see `LAYER_SLOTS`) loads into, beyond the common ones in converter/cpu/graph.py. `lora`: the
    graph takes LoRA signature inputs (litert-torch's attention applies them to q/k/v/o; a model
    class that does not pass them on is wrapped, see converter/cpu/graph.py's `with_lora`).
    `configure(model_config, config_json)` sets what config.json decides beyond the sizes (soft
    caps, sliding windows); it only sets attributes, so family files never import litert-torch.
    """

    example: str
    config: str
    model: str
    params: dict[str, str] = field(default_factory=dict)
    lora: bool = False
    configure: Callable[[Any, dict], None] | None = None


@dataclass(frozen=True)
class ModelType:
    """A MediaPipe model type: enum value, the real hyperparameters of its checkpoints,
    whether MediaPipe's runtime takes LoRA weights for it and its context: the most positions
    (prompt + output) its checkpoints were made for (config.json's max_position_embeddings),
    which LlmParameters does not carry; 0 if unknown."""

    name: str
    enum_value: int
    reference: Dims
    lora: bool = True
    context: int = 0


@dataclass(frozen=True)
class ModelFamily:
    """Everything the converter knows about one architecture family, as data."""

    name: str
    hf_model_types: tuple[str, ...]
    model_types: tuple[ModelType, ...]
    head: tuple[WeightRule, ...]
    layer: tuple[WeightRule, ...]
    tail: tuple[WeightRule, ...]
    lora: tuple[LoraRule, ...]
    required_lora: tuple[str, ...]
    parameters: Callable[[Dims, dict], llm_params_pb2.LlmParameters]
    quantizations: tuple[str, ...] = ("int8", "int4", "fp16", "fp32")
    backends: tuple[str, ...] = ("gpu",)
    lora_float: str = "fp16"  # how MediaPipe stores LoRA halves (tile4): fp16 (Gemma) or fp32 (Phi-2)
    layer_prefix: str = "model.layers.{i}."
    mp_layer_prefix: str = "params.lm.transformer.x_layers_{i}."
    config_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    architecture: Architecture = Architecture()
    name_prefixes: tuple[str, ...] = ()  # checkpoint name prefixes to drop (a multimodal model's text part)
    skipped: tuple[str, ...] = ()  # checkpoint names containing one of these are not part of the text model
    untokenized_rows: int = 0  # embedding rows no tokenizer piece names (Gemma 3's 64 image-token rows)
    text_config: Callable[[dict], dict] = dict  # the text model's settings out of config.json (nested, defaults)
    # (name, of): a tensor the file has no place for, accepted only as an exact copy of `of`
    # (Gemma's lm_head saved tied to the embedding); a different one is refused, never dropped.
    tied_copies: tuple[tuple[str, str], ...] = ()
    cpu: CpuGraph | None = None  # the litert-torch graph for --backend cpu; None: GPU only

    def model_type(self, name: str) -> ModelType:
        return next(t for t in self.model_types if t.name == name)

    def text_name(self, name: str) -> str:
        """A checkpoint or adapter name without the family's `name_prefixes` (each dropped once,
        wherever it stands: `language_model.model.layers...`, `model.language_model.layers...`)."""
        for prefix in self.name_prefixes:
            name = name.replace(prefix, "", 1)
        return name

    def lora_rule(self, module: str) -> LoraRule | None:
        return next((rule for rule in self.lora if rule.hf_module == module), None)


# config.json keys for each Dims field, first match wins.
DEFAULT_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "n_layer"),
    "hidden_size": ("hidden_size", "n_embd"),
    "intermediate_size": ("intermediate_size", "ffn_hidden_size"),
    "num_heads": ("num_attention_heads", "n_head"),
    "num_kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "vocab_size": ("vocab_size",),
}


MAX_LAYERS = 4096  # real models have at most a few hundred
MAX_SIZE = 2**24  # any width, head count or vocabulary (real ones are below 2**19)
MAX_PARAMETERS = 2**40  # the weights a config may describe


def dims_from_config(family: ModelFamily, config: dict, source: str) -> Dims:
    """Read Dims from a config.json dict (kv heads default to heads, head_dim to hidden/heads),
    refusing values of the wrong type, absurd sizes and shapes the attention cannot have."""
    keys = {**DEFAULT_CONFIG_KEYS, **family.config_keys}
    config = family.text_config(config)
    values: dict[str, int] = {}
    for name, candidates in keys.items():
        key = next((k for k in candidates if config.get(k) is not None), None)
        if key is not None:
            high = MAX_LAYERS if name == "num_layers" else MAX_SIZE
            values[name] = integer(config, key, high=high, source=source)
    values.setdefault("num_kv_heads", values.get("num_heads", 0))
    derived_head_dim = "head_dim" not in values
    if derived_head_dim and values.get("num_heads"):
        values["head_dim"] = values.get("hidden_size", 0) // values["num_heads"]
    missing = [keys[name][0] for f in fields(Dims) if (name := f.name) not in values]
    if missing:
        raise ConversionError(f"{source}: missing {', '.join(missing)}")
    dims = Dims(**values)
    check_dims(family, dims, source, keys, derived_head_dim)
    return dims


def check_dims(family: ModelFamily, dims: Dims, source: str, keys: dict[str, tuple[str, ...]],
               derived_head_dim: bool) -> None:
    """Refuse sizes the attention cannot have or that describe an absurdly large model."""
    heads, kv_heads = keys["num_heads"][0], keys["num_kv_heads"][0]
    if dims.num_heads % dims.num_kv_heads:
        raise ConversionError(f"{source}: {kv_heads} {dims.num_kv_heads} does not divide {heads} "
                              f"{dims.num_heads} (each KV head serves a whole group of query heads)")
    if (derived_head_dim or not family.architecture.free_head_dim) and dims.q_size != dims.hidden_size:
        raise ConversionError(f"{source}: {keys['hidden_size'][0]} {dims.hidden_size} is not {heads} "
                              f"{dims.num_heads} x head_dim {dims.head_dim}, as {family.name} requires")
    rotary = int(dims.head_dim * family.architecture.rotary_fraction)
    if family.architecture.position == "rope" and (rotary == 0 or rotary % 2):
        raise ConversionError(f"{source}: head_dim {dims.head_dim} gives {rotary} rotary dimensions; "
                              "rotary embeddings rotate pairs, so it must be even and positive")
    layer = dims.hidden_size * dims.qkv_size + dims.q_size * dims.hidden_size + 3 * dims.hidden_size * dims.intermediate_size
    total = 2 * dims.vocab_size * dims.hidden_size + dims.num_layers * layer
    if total > MAX_PARAMETERS:
        raise ConversionError(f"{source}: the sizes describe about {total:.2g} parameters ({dims.describe()}); "
                              f"more than {MAX_PARAMETERS:.2g} is refused")


def sized_parameters(dims: Dims, start_token_id: int, stop_tokens: list[str],
                     num_kv_heads: int | None = None) -> llm_params_pb2.LlmParameters:
    """LlmParameters with what every family writes alike: vocabulary, start/stop tokens, batch 1, the
    transformer's sizes (`num_kv_heads` defaults to MediaPipe's 0-for-multi-head convention) and the
    runtime's embedding flags (no absolute positions, per-layer/ngrammer embeddings loaded on demand)."""
    params = llm_params_pb2.LlmParameters(vocab_size=dims.vocab_size, start_token_id=start_token_id,
                                          stop_tokens=stop_tokens)
    t = params.transformer_parameters
    t.batch_size = 1
    t.embedding_dim = dims.hidden_size
    t.hidden_dimension = dims.intermediate_size
    t.head_dimension = dims.head_dim
    t.num_heads = dims.num_heads
    t.num_stacks = dims.num_layers
    t.num_kv_heads = kv_heads_field(dims) if num_kv_heads is None else num_kv_heads
    t.skip_absolute_positional_embeddings = True
    t.load_per_layer_embedding_dynamically = True
    t.load_ngrammer_embedding_dynamically = True
    return params


def kv_heads_field(dims: Dims) -> int:
    """MediaPipe's num_kv_heads: 0 means multi-head attention (as many KV heads as heads)."""
    return 0 if dims.num_kv_heads == dims.num_heads else dims.num_kv_heads


def rope_theta(config: dict) -> float:
    """The rotary base, from either transformers 4 (`rope_theta`) or 5 (`rope_parameters`)."""
    parameters = mapping(config, "rope_parameters")
    found = parameters if "rope_theta" in parameters else config
    return number(found, "rope_theta", 10000.0, above_low=True)


def is_close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6)


def check_parameters(params: Message, path: str = "LlmParameters") -> None:
    """Refuse parameters holding a number that is not finite or is negative (as stored: a float32
    field turns 1e39 into inf), so a NaN or a negative window is never written."""
    stored = type(params).FromString(params.SerializeToString())
    for descriptor, value in stored.ListFields():
        items = value if descriptor.is_repeated else [value]
        for item in items:
            if descriptor.type == FieldDescriptor.TYPE_MESSAGE:
                check_parameters(item, f"{path}.{descriptor.name}")
            elif isinstance(item, (int, float)) and not isinstance(item, bool) and not (
                    math.isfinite(item) and item >= 0):
                raise ConversionError(f"config.json: the settings give {path}.{descriptor.name} the value {item}; "
                                      "expected a finite number of at least 0")
