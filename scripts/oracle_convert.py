"""Run MediaPipe 0.10.21's LLM converter (the oracle). Runs inside the oracle venv only.

    $(scripts/setup_oracle.sh) scripts/oracle_convert.py --model-type GEMMA_2B \
        --input-ckpt CKPT --vocab-model-file TOK --output-dir OUT [--lora-ckpt A --lora-rank 8]
"""
import argparse

from mediapipe.tasks.python.genai.converter import llm_converter


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
    llm_converter.convert_checkpoint(config)


if __name__ == "__main__":
    main()
