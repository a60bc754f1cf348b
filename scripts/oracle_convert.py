"""Run MediaPipe 0.10.21's LLM converter (the oracle). Runs inside the oracle venv only.

    $(scripts/setup_oracle.sh) scripts/oracle_convert.py --model-type GEMMA_2B \
        --input-ckpt CKPT --vocab-model-file TOK --output-dir OUT --output-tflite-file F \
        [--lora-ckpt A --lora-rank 8 --lora-output-tflite-file L] [--bins-only]

`--bins-only` runs just MediaPipe's Python half (read, map, quantize, write one raw bin per
tensor into OUT), which works on any tensor subset and shape; the closed C++ step that
assembles the final file needs every tensor at the model type's real shapes.
"""
import argparse
import os
import re

from mediapipe.tasks.python.genai.converter import converter_factory, llm_converter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-type", required=True)
    parser.add_argument("--input-ckpt", required=True)
    parser.add_argument("--ckpt-format", default="safetensors")
    parser.add_argument("--vocab-model-file", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--output-tflite-file", required=True)
    parser.add_argument("--bits", type=int, default=8, help="attention/feedforward/embedding bits")
    parser.add_argument("--lora-ckpt")
    parser.add_argument("--lora-rank", type=int)
    parser.add_argument("--lora-output-tflite-file")
    parser.add_argument("--bins-only", action="store_true")
    parser.add_argument("--rename-lora-bins", action="store_true",
                        help="PHI_2: give the LoRA bins the names PhiMapper means to (0.10.21 leaves them unrenamed)")
    args = parser.parse_args()
    config = llm_converter.ConversionConfig(
        input_ckpt=args.input_ckpt,
        ckpt_format=args.ckpt_format,
        model_type=args.model_type,
        backend="gpu",
        output_dir=args.output_dir,
        attention_quant_bits=args.bits,
        feedforward_quant_bits=args.bits,
        embedding_quant_bits=args.bits,
        vocab_model_file=args.vocab_model_file,
        output_tflite_file=args.output_tflite_file,
        lora_ckpt=args.lora_ckpt,
        lora_rank=args.lora_rank,
        lora_output_tflite_file=args.lora_output_tflite_file,
    )
    if args.rename_lora_bins:
        convert_with_renamed_lora_bins(config, args.bits)
        return
    if not args.bins_only:
        llm_converter.convert_checkpoint(config)
        return
    write_bins(config, config.input_ckpt, args.bits)


def write_bins(config, checkpoint: str, bits: int) -> None:
    """MediaPipe's Python half: read, map, quantize, one bin per tensor into the output folder."""
    loader = converter_factory.create_ckpt_loader(
        config.ckpt_format, ckpt_path=checkpoint, is_symmetric=True, backend="gpu",
        attention_quant_bits=bits, feedforward_quant_bits=bits, embedding_quant_bits=bits,
        special_model=config.model_type, fp16_scale=None,
    )
    llm_converter.maybe_quantize_and_write_tensors_to_bins(loader, config)


# PhiMapper's attention renames (q/k/v_proj -> q/k/v, dense -> post) and its LoRA rule
# (A -> w_prime_left, B -> w_prime_right; swapped for post), which LoRA keys never reach in 0.10.21.
PHI_LORA_BIN = re.compile(r"self_attn\.(q_proj|k_proj|v_proj|dense)\.lora_([AB])\.w")
PHI_MODULES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "dense": "post"}


def intended_phi_lora_name(name: str) -> str:
    def replace(match: re.Match) -> str:
        module, half = PHI_MODULES[match.group(1)], match.group(2)
        left = (half == "A") != (module == "post")
        return f"self_attention.{module}.w_prime_{'left' if left else 'right'}"

    return PHI_LORA_BIN.sub(replace, name)


def convert_with_renamed_lora_bins(config, bits: int) -> None:
    write_bins(config, config.input_ckpt, bits)
    write_bins(config, config.lora_ckpt, bits)
    for entry in os.listdir(config.output_dir):
        renamed = intended_phi_lora_name(entry)
        if renamed != entry:
            os.rename(os.path.join(config.output_dir, entry), os.path.join(config.output_dir, renamed))
    info = os.path.join(config.output_dir, "layer_info.txt")
    with open(info) as handle:
        lines = [intended_phi_lora_name(line) for line in handle]
    with open(info, "w") as handle:
        handle.writelines(lines)
    llm_converter.sort_layer_info(info)
    llm_converter.combined_weight_bins_to_tflite(
        config.model_type, config.backend, weight_path=config.output_dir,
        output_tflite_file=config.output_tflite_file, obfuscate=config.obfuscate,
        vocab_model_file=config.vocab_model_file, lora_rank=config.lora_rank, lora_weight_path=config.output_dir,
        lora_output_tflite_file=config.lora_output_tflite_file,
    )


if __name__ == "__main__":
    main()
