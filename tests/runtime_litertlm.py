"""Generate with LiteRT-LM's GPU backend (run in a subprocess by the tests: native code, hard timeout).

    python tests/runtime_litertlm.py MODEL.litertlm PROMPT MAX_TOKENS [LORA.bin RANK]
Prints one JSON line: {"base": text, "lora": text or null}. PROMPT may be a JSON list of prompts
(one engine, shaders compiled once); then each value is a list of texts, one per prompt.
"""
import json
import sys
import tempfile

import litert_lm as lm


def main() -> None:
    model, prompt, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    lora, rank = (sys.argv[4], int(sys.argv[5])) if len(sys.argv) > 5 else (None, 0)
    prompts = json.loads(prompt) if prompt.startswith("[") else [prompt]
    lm.set_min_log_severity(lm.LogSeverity.ERROR)
    with tempfile.TemporaryDirectory() as cache:
        options = {"lora_rank_config": lm.LoraRankConfig(lora_rank=rank)} if lora else {}
        engine = lm.Engine(model, backend=lm.Backend.GPU(), max_num_tokens=max_tokens, cache_dir=cache, **options)
        texts = {"base": [], "lora": [] if lora else None}
        for text in prompts:
            for name, path in (("base", None), ("lora", lora)):
                if name == "lora" and not path:
                    continue
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
