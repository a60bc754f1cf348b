"""Run MediaPipe 0.10.21's LLM converter (the oracle). Runs inside the oracle venv only.

    $(scripts/setup_oracle.sh) scripts/oracle_convert.py --model-type GEMMA_2B \
        --input-ckpt CKPT --vocab-model-file TOK --output-dir OUT --output-tflite-file F \
        [--lora-ckpt A --lora-rank 8 --lora-output-tflite-file L] [--bins-only]

`--bins-only` runs just MediaPipe's Python half (read, map, quantize, write one raw bin per
tensor into OUT), which works on any tensor subset and shape; the closed C++ step that
assembles the final file needs every tensor at the model type's real shapes.
"""
import argparse

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
    if not args.bins_only:
        llm_converter.convert_checkpoint(config)
        return
    loader = converter_factory.create_ckpt_loader(
        config.ckpt_format, ckpt_path=config.input_ckpt, is_symmetric=True, backend="gpu",
        attention_quant_bits=args.bits, feedforward_quant_bits=args.bits, embedding_quant_bits=args.bits,
        special_model=config.model_type, fp16_scale=None,
    )
    llm_converter.maybe_quantize_and_write_tensors_to_bins(loader, config)


if __name__ == "__main__":
    main()
