"""Gemma 2 and Gemma 3: LlmParameters equal MediaPipe's, and the reference runtime over our
converted files agrees with transformers (+ PEFT) on tiny random models that exercise every
setting (GQA, soft caps, attention scale, post norms, QK norms, sliding window, global layers,
linear rotary scaling, the text part of a multimodal checkpoint)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from converter import ConversionConfig, convert
from converter.errors import ConversionError
from converter.models import find_model_type
from converter.models.base import dims_from_config
from converter.proto import llm_params_pb2
from converter.proto.transformer_params_pb2 import TransformerParameters as TP
from converter.tflite import WeightFile
from harness.reference import ReferenceModel

from .conftest import ROOT, TOKENIZER

sys.path.insert(0, str(ROOT / "scripts"))
from make_checkpoint import PRESETS, hf_config, model_shapes, write_adapter, write_sharded  # noqa: E402

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [[2, 10, 20, 30, 40, 50], [2, 300, 7, 99, 5, 6, 7, 8, 9, 10, 11]]  # the second is longer than the window

# LlmParameters that MediaPipe 0.10.21's GPU converter wrote for GEMMA2_2B (read out of its output
# file; shared/reference/mediapipe-format.md section 4.2).
MEDIAPIPE_GEMMA2_2B = bytes.fromhex(
    "0a4308011880122080482880023008381a48045a08080110011802200262070801150000f04168027002780282010d0801100118"
    "0125000048422802900101b80101c001011080d00f20022a053c656f733e"
)


def parameters(model_type: str, config: dict) -> llm_params_pb2.LlmParameters:
    family, _ = find_model_type(model_type)
    return family.parameters(dims_from_config(family, config, "config.json"), config)


def test_gemma2_2b_parameters_are_mediapipes_bytes():
    config = hf_config(PRESETS["GEMMA2_2B"]).to_dict()
    assert parameters("GEMMA2_2B", config).SerializeToString() == MEDIAPIPE_GEMMA2_2B


def upstream_gemma3(vocab, d_model, d_ff, head_dim, heads, layers, kv_heads, window, scaling, bf16_fix, scale_type):
    """Gemma 3 parameters as written out in upstream MediaPipe's well_known_models.cc (GetGemma3_*Params),
    plus the two flags 0.10.21's GPU converter adds to every file."""
    params = llm_params_pb2.LlmParameters(start_token_id=2, stop_tokens=["<eos>", "<end_of_turn>"], vocab_size=vocab)
    t = params.transformer_parameters
    t.batch_size, t.embedding_dim, t.hidden_dimension, t.head_dimension = 1, d_model, d_ff, head_dim
    t.num_heads, t.num_stacks, t.num_kv_heads = heads, layers, kv_heads
    t.pre_norm = t.post_norm = t.final_norm = TP.RMS_NORM
    t.skip_absolute_positional_embeddings = True
    t.num_local_layers_per_global = 5
    t.global_rope_wavelength = 1000000.0
    if scaling:
        t.global_rope_scaling = scaling
    if bf16_fix:
        t.gemma3_bfloat16_fix = True
    sa = t.self_attention_parameters
    sa.attention_mask_type, sa.qkv_no_bias, sa.post_proj_no_bias = TP.CAUSAL, True, True
    sa.attention_scale_type, sa.soft_cap_value, sa.qk_norm, sa.sliding_window_size = scale_type, 0.0, True, window
    ff = t.feed_forward_parameters
    ff.no_bias, ff.activation, ff.pre_norm, ff.post_norm = True, TP.GELU, TP.RMS_NORM, TP.RMS_NORM
    t.final_project_parameters.no_bias = True
    t.load_per_layer_embedding_dynamically = t.load_ngrammer_embedding_dynamically = True
    return params


# config.json files as transformers 4 wrote them for the published checkpoints (defaults left out).
GEMMA3_1B_V4 = {
    "model_type": "gemma3_text", "head_dim": 256, "hidden_size": 1152, "intermediate_size": 6912,
    "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "query_pre_attn_scalar": 256,
    "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512,
    "sliding_window_pattern": 6, "vocab_size": 262144, "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
}
GEMMA3_27B_V4 = {"model_type": "gemma3", "text_config": {
    "head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504, "model_type": "gemma3_text",
    "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16, "query_pre_attn_scalar": 168,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}}
GEMMA3_4B_V4 = {"model_type": "gemma3", "text_config": {
    "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}}


@pytest.mark.parametrize("model_type,config,expected", [
    ("GEMMA3_1B", hf_config(PRESETS["GEMMA3_1B"]).to_dict(),
     (262144, 1152, 6912, 256, 4, 26, 1, 512, None, False, TP.SCALE_TYPE_INV_SQRT_HEAD_DIM)),
    ("GEMMA3_1B", GEMMA3_1B_V4, (262144, 1152, 6912, 256, 4, 26, 1, 512, None, False, TP.SCALE_TYPE_INV_SQRT_HEAD_DIM)),
    ("GEMMA3_300M", hf_config(PRESETS["GEMMA3_300M"]).to_dict(),
     (262144, 640, 2048, 256, 4, 18, 1, 512, None, True, TP.SCALE_TYPE_INV_SQRT_HEAD_DIM)),
    ("GEMMA3_4B", GEMMA3_4B_V4, (262208, 2560, 10240, 256, 8, 34, 4, 1024, 8.0, True, TP.SCALE_TYPE_INV_SQRT_HEAD_DIM)),
    ("GEMMA3_27B", GEMMA3_27B_V4,
     (262208, 5376, 21504, 128, 32, 62, 16, 1024, 8.0, True, TP.SCALE_TYPE_INV_SQRT_D_MODEL_DIV_NUM_HEADS)),
])
def test_gemma3_parameters_follow_upstream(model_type, config, expected):
    assert parameters(model_type, config) == upstream_gemma3(*expected)


@pytest.mark.parametrize("change,message", [
    ({"query_pre_attn_scalar": 100}, "query_pre_attn_scalar 100"),
    ({"rope_local_base_freq": 20000}, "sliding-window rope_theta 20000"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "full_attention rope_type 'yarn'"),
    ({"layer_types": ["full_attention"] + ["sliding_attention"] * 25}, "layer_types must repeat"),
    ({"hidden_activation": "silu"}, "hidden_activation 'silu'"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
])
def test_gemma3_settings_the_runtime_cannot_follow_are_refused(change, message):
    with pytest.raises(ConversionError, match=message):
        parameters("GEMMA3_1B", {**GEMMA3_1B_V4, **change})


def make_tiny(preset: str, folder: Path) -> tuple[Path, Path]:
    """A tiny random checkpoint (every tensor random, norms included) and a q/k/v/o/MLP adapter (alpha 32, r 8)."""
    config = hf_config(PRESETS[preset])
    config.save_pretrained(str(folder))
    shapes = model_shapes(config)
    write_sharded(shapes, folder, 0, torch.float32, 1 << 30)
    (folder / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())
    adapter = folder.parent / f"{folder.name}-lora"
    write_adapter(shapes, adapter, 8, 32.0, ALL_TARGETS, 0, torch.float32)
    return folder, adapter


def hf_models(checkpoint: Path, adapter: Path, **overrides):
    """transformers' model and PEFT's, with the LoRA halves rounded to fp16 as we store them (B * alpha / r)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def base():
        return AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32, **overrides).eval()

    peft = PeftModel.from_pretrained(base(), str(adapter)).eval()
    scale = peft.peft_config["default"].lora_alpha / peft.peft_config["default"].r
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:
                parameter.copy_((parameter * scale).half().float() / scale)
            elif "lora_A" in name:
                parameter.copy_(parameter.half().float())
    return base(), peft


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


FAMILIES = {"TINY_GEMMA2": "GEMMA2_2B", "TINY_GEMMA3": "GEMMA3_1B"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    """(preset, checkpoint, adapter, {quantization: (base file, LoRA file)})."""
    preset = request.param
    folder = tmp_path_factory.mktemp(preset.lower())
    checkpoint, adapter = make_tiny(preset, folder / "ckpt")
    files = {}
    for quantization in ("fp32", "int8"):
        result = convert(ConversionConfig(
            input_ckpt=checkpoint, ckpt_format="safetensors", model_type=FAMILIES[preset],
            output_dir=folder / quantization, vocab_model_file=TOKENIZER, quantization=quantization,
            lora_ckpt=adapter, lora_rank=8))
        files[quantization] = (WeightFile(result.output), WeightFile(result.lora_output))
    return preset, checkpoint, adapter, files


def test_reference_runtime_matches_transformers_and_peft(tiny):
    preset, checkpoint, adapter, files = tiny
    base, peft = hf_models(checkpoint, adapter)
    ours_base, ours_lora = ReferenceModel(files["fp32"][0]), ReferenceModel(*files["fp32"])
    for ids in PROMPTS:
        theirs_base, theirs_lora = logits(base, ids), logits(peft, ids)
        torch.testing.assert_close(ours_base.forward(ids)[0], theirs_base, atol=2e-5, rtol=0)
        torch.testing.assert_close(ours_lora.forward(ids)[0], theirs_lora, atol=2e-5, rtol=0)
        assert (theirs_lora - theirs_base).abs().max() > 0.05  # the adapter matters
        int8 = ReferenceModel(*files["int8"]).forward(ids)[0]  # int8 rounding: bounded, far from random logits
        assert (int8 - theirs_lora).abs().max() < 0.1 * theirs_lora.abs().max()


# Settings of each tiny model that must change transformers' logits, so agreement above proves we follow them.
SETTINGS = {
    "TINY_GEMMA2": [{"attn_logit_softcapping": None}, {"final_logit_softcapping": None},
                    {"query_pre_attn_scalar": 32}],
    "TINY_GEMMA3": [{"sliding_window": 64},
                    {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}],
}


def test_each_setting_changes_transformers_logits(tiny):
    from transformers import AutoModelForCausalLM

    preset, checkpoint, adapter, files = tiny
    reference = logits(AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32), PROMPTS[1])
    for override in SETTINGS[preset]:
        changed = logits(AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32, **override),
                         PROMPTS[1])
        assert (changed - reference).abs().max() > 1e-3, override


def test_kv_cache_decoding_equals_full_forward(tiny):
    model = ReferenceModel(*tiny[3]["int8"])
    ids = PROMPTS[1]
    full, _ = model.forward(ids)
    first, cache = model.forward(ids[:5])
    rest, _ = model.forward(ids[5:], cache)
    torch.testing.assert_close(torch.cat([first, rest]), full, atol=1e-5, rtol=0)


def multimodal_gemma3(folder: Path, layers: int, seed: int):
    """A tiny random Gemma3ForConditionalGeneration (vision tower, projector, 64 image-token rows)
    saved to `folder` as transformers saves it; returned in eval mode."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(vocab_size=512 + 64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.05)
    model.eval().save_pretrained(str(folder))
    return model


def test_text_part_of_a_multimodal_gemma3_checkpoint(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint as transformers saves it (`language_model.` names,
    vision tower, projector) converts as GEMMA3_4B from its text part; the 64 image-token rows have
    no tokenizer pieces and the bundle accepts that; the logits are transformers'."""
    from click.testing import CliRunner

    from bundler.cli import main as bundle_main

    model = multimodal_gemma3(tmp_path / "ckpt", layers=7, seed=0)
    result = convert(ConversionConfig(input_ckpt=tmp_path / "ckpt", ckpt_format="safetensors", model_type="GEMMA3_4B",
                                      output_dir=tmp_path / "out", vocab_model_file=TOKENIZER, quantization="fp32"))
    ours = ReferenceModel(WeightFile(result.output))
    assert ours.parameters.vocab_size == 576
    for ids in PROMPTS:
        torch.testing.assert_close(ours.forward(ids)[0], logits(model, ids), atol=2e-5, rtol=0)
    bundle = CliRunner().invoke(bundle_main, ["--tflite-model", str(result.output), "--tokenizer-model", str(TOKENIZER),
                                              "--start-token", "<bos>", "--stop-tokens", "<eos>",
                                              "--output-filename", str(tmp_path / "model.task")])
    assert bundle.exit_code == 0, bundle.output
    # 64 fewer pieces is Gemma 3's exception, not a general one: another count is still refused.
    from make_tokenizer import train

    train(tmp_path / "short.model", 500)
    other = CliRunner().invoke(bundle_main, ["--tflite-model", str(result.output), "--tokenizer-model",
                                             str(tmp_path / "short.model"), "--start-token", "<bos>",
                                             "--stop-tokens", "<eos>", "--output-filename", str(tmp_path / "x.task")])
    assert other.exit_code == 1 and "has 500 pieces" in other.stderr


def test_adapter_of_a_multimodal_gemma3_converts_for_its_text_part(tmp_path):
    """A PEFT adapter trained on Gemma3ForConditionalGeneration (keys `...language_model.layers...`,
    plus vision-tower LoRA the text runtime has no place for: left out with a warning) converts as a
    LoRA file and merges; both give PEFT's text-only logits."""
    from peft import LoraConfig, get_peft_model

    model = multimodal_gemma3(tmp_path / "ckpt", layers=2, seed=1)
    base_logits = [logits(model, ids) for ids in PROMPTS]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                      "o_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    assert any("vision_tower" in name and "lora_A" in name for name, _ in peft_model.named_parameters())
    peft_model.eval().save_pretrained(str(tmp_path / "lora"))
    common = dict(input_ckpt=tmp_path / "ckpt", ckpt_format="safetensors", model_type="GEMMA3_4B",
                  vocab_model_file=TOKENIZER, quantization="fp32", lora_ckpt=tmp_path / "lora")
    as_lora = convert(ConversionConfig(output_dir=tmp_path / "a", lora_rank=4, **common))
    merged = convert(ConversionConfig(output_dir=tmp_path / "m", merge_lora=True, **common))
    runs = {3e-5: ReferenceModel(WeightFile(merged.output)),  # merged in float32
            2e-3: ReferenceModel(WeightFile(as_lora.output), WeightFile(as_lora.lora_output))}  # fp16 halves
    for ids, base in zip(PROMPTS, base_logits):
        expected = logits(peft_model, ids)
        assert (expected - base).abs().max() > 0.05  # the adapter changes the text model's output
        for tolerance, ours in runs.items():
            torch.testing.assert_close(ours.forward(ids)[0], expected, atol=tolerance, rtol=0)


def test_gemma_7b_parameters_are_mediapipes_2b_bytes_with_7b_sizes():
    """MediaPipe's GEMMA_2B bytes (read out of its file) with upstream GetGemma7BParams' sizes (MHA: 0 KV heads)."""
    from .test_models import MEDIAPIPE_GEMMA_2B

    expected = llm_params_pb2.LlmParameters.FromString(MEDIAPIPE_GEMMA_2B)
    t = expected.transformer_parameters
    t.embedding_dim, t.hidden_dimension, t.num_heads, t.num_stacks, t.num_kv_heads = 3072, 8 * 3072, 16, 28, 0
    config = hf_config(PRESETS["GEMMA_7B"]).to_dict()
    assert parameters("GEMMA_7B", config).SerializeToString() == expected.SerializeToString()


@pytest.mark.runtime
def test_litertlm_gpu_output_equals_the_reference_runtime(tiny, tmp_path):
    """LiteRT-LM's GPU executor (SwiftShader) loads the tiny Gemma 2 / Gemma 3 int8 files and
    generates the reference runtime's greedy text, with and without the LoRA file."""
    from .test_harness import assert_litertlm_matches_reference

    preset, _, _, files = tiny
    base, adapter = (weights.path for weights in files["int8"])
    assert_litertlm_matches_reference(base, adapter, tmp_path / f"{preset.lower()}.litertlm")
