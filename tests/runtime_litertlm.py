"""Generate with LiteRT-LM's GPU (or CPU) backend (run in a subprocess by the tests: native code, hard timeout).

    python tests/runtime_litertlm.py MODEL.litertlm PROMPT MAX_TOKENS [LORA.bin RANK] [--cpu]
Prints one JSON line: {"base": text, "lora": text or null}. PROMPT may be a JSON list of prompts
(one engine, shaders compiled once); then each value is a list of texts, one per prompt.
"""
import json
import sys
import tempfile

import litert_lm as lm


def main() -> None:
    args = [arg for arg in sys.argv[1:] if arg != "--cpu"]
    cpu = len(args) < len(sys.argv) - 1
    model, prompt, max_tokens = args[0], args[1], int(args[2])
    lora, rank = (args[3], int(args[4])) if len(args) > 4 else (None, 0)
    prompts = json.loads(prompt) if prompt.startswith("[") else [prompt]
    lm.set_min_log_severity(lm.LogSeverity.ERROR)
    with tempfile.TemporaryDirectory() as cache:
        # The CPU graph's LoRA rank is fixed by its inputs; the rank option is the GPU executor's.
        options = {"lora_rank_config": lm.LoraRankConfig(lora_rank=rank)} if lora and not cpu else {}
        backend = lm.Backend.CPU() if cpu else lm.Backend.GPU()
        engine = lm.Engine(model, backend=backend, max_num_tokens=max_tokens, cache_dir=cache, **options)
        texts = {"base": [], "lora": [] if lora else None}
        # Every base session before any LoRA one: LiteRT-LM's CPU executor keeps applying a LoRA it
        # loaded to later sessions of the engine that name none.
        for name, path in (("base", None), ("lora", lora)):
            if name == "lora" and not path:
                continue
            for text in prompts:
                extra = {"lora_config": lm.LoraConfig(lora_path=path)} if path else {}
                session = engine.create_session(apply_prompt_template=False, sampler_config=lm.SamplerConfig(
                    top_k=1, temperature=0.0, seed=0), **extra)
                session.run_prefill([text])
                texts[name].append(session.run_decode().texts[0])
    if not prompt.startswith("["):
        texts = {name: value[0] if value is not None else None for name, value in texts.items()}
    print(json.dumps(texts))


if __name__ == "__main__":
    main()
