"""Run MediaPipe 0.10.21's LLM bundler (the oracle). Runs inside the oracle venv only.

    $(scripts/setup_oracle.sh) scripts/oracle_bundle.py --tflite-model M --tokenizer-model T \
        --start-token "<bos>" --stop-tokens "<eos>" --output-filename OUT.task [--prompt-prefix P ...]
"""
import argparse

from mediapipe.tasks.python.genai.bundler import llm_bundler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tflite-model", required=True)
    parser.add_argument("--tokenizer-model", required=True)
    parser.add_argument("--start-token", required=True)
    parser.add_argument("--stop-tokens", action="append", required=True)
    parser.add_argument("--output-filename", required=True)
    parser.add_argument("--enable-bytes-to-unicode-mapping", action="store_true")
    parser.add_argument("--system-prompt")
    parser.add_argument("--prompt-prefix")
    parser.add_argument("--prompt-suffix")
    args = parser.parse_args()
    llm_bundler.create_bundle(llm_bundler.BundleConfig(
        tflite_model=args.tflite_model, tokenizer_model=args.tokenizer_model, start_token=args.start_token,
        stop_tokens=args.stop_tokens, output_filename=args.output_filename,
        enable_bytes_to_unicode_mapping=args.enable_bytes_to_unicode_mapping, system_prompt=args.system_prompt,
        prompt_prefix=args.prompt_prefix, prompt_suffix=args.prompt_suffix,
    ))


if __name__ == "__main__":
    main()
