"""The LiteRT-LM engine in a process of its own, driven by `harness/litertlm_runtime.py` over JSON
lines: its native code can abort or hang, and only a separate process can be timed out and
killed without taking `lora-run` (or `lora-run serve`) with it.

    python -m harness.litertlm_worker MODEL.litertlm gpu|cpu MAX_TOKENS LORA_RANK CACHE_DIR
Requests on stdin, one JSON object a line; answers on the protocol stream (the original stdout;
fd 1 is pointed at stderr so that native code printing cannot corrupt it):
    {"tokenize": TEXT}  -> {"ids": [...]}   (for a bundle whose tokenizer only the engine reads)
    {"generate": PROMPT, "lora": PATH|null, "top_k", "temperature", "seed", "max_new"}
                        -> {"piece": TEXT}... then {"done": true}
    {"cancel": true}    (while generating) ends the generation at its next piece
The first answer is {"ready": true} once the engine is made; any failure is {"error": MESSAGE}.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from typing import IO

from converter.supervisor import die_with_parent

BACKENDS = {"gpu": "GPU", "cpu": "CPU"}


class Worker:
    def __init__(self, answers: IO[str], model: str, backend: str, max_tokens: int, rank: int, cache: str):
        import litert_lm as lm

        self.lm, self.answers = lm, answers
        lm.set_min_log_severity(lm.LogSeverity.ERROR)
        # The GPU executor's LoRA rank is an engine option; a CPU graph's is fixed by its LoRA inputs.
        options = {"lora_rank_config": lm.LoraRankConfig(lora_rank=rank)} if rank and backend == "gpu" else {}
        self.engine = lm.Engine(model, backend=getattr(lm.Backend, BACKENDS[backend])(), max_num_tokens=max_tokens,
                                cache_dir=cache, **options)
        self.cancelled = threading.Event()

    def answer(self, **fields) -> None:
        self.answers.write(json.dumps(fields) + "\n")
        self.answers.flush()

    def generate(self, request: dict) -> None:
        """A fresh session per generation (a session's KV cache is not reset after its decode), closed after it."""
        lm = self.lm
        extra = {"lora_config": lm.LoraConfig(lora_path=request["lora"])} if request["lora"] else {}
        sampler = lm.SamplerConfig(top_k=request["top_k"], temperature=request["temperature"], seed=request["seed"])
        session = self.engine.create_session(apply_prompt_template=False, sampler_config=sampler, **extra)
        try:
            session.run_prefill([request["generate"]])
            left = request["max_new"]
            for chunk in session.run_decode_async():
                if self.cancelled.is_set() or left <= 0:
                    session.cancel_process()
                    break
                text = "".join(chunk.texts)
                if text:
                    self.answer(piece=text)
                left -= 1
        finally:
            session.close()
        self.answer(done=True)

    def close(self) -> None:
        self.engine.close()


def serve(worker: Worker, requests: IO[str]) -> None:
    """Answer requests until stdin closes; a cancel line may arrive while a generation runs, so
    lines are read on a thread of their own and queued."""
    import queue

    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in requests:
            if json.loads(line).get("cancel"):
                worker.cancelled.set()
            else:
                lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    while (line := lines.get()) is not None:
        request = json.loads(line)
        worker.cancelled.clear()
        try:
            if "tokenize" in request:
                worker.answer(ids=list(worker.engine.tokenize(request["tokenize"])))
            else:
                worker.generate(request)
        except Exception as exc:  # the engine's own errors (RuntimeError and such): one line back
            worker.answer(error=f"{type(exc).__name__}: {exc}".splitlines()[0])


def main() -> None:
    die_with_parent()
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    model, backend, max_tokens, rank, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    try:
        worker = Worker(answers, model, backend, max_tokens, rank, cache)
    except Exception as exc:
        answers.write(json.dumps({"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}) + "\n")
        answers.flush()
        sys.exit(1)
    worker.answer(ready=True)
    try:
        serve(worker, sys.stdin)
    finally:
        worker.close()


if __name__ == "__main__":
    main()
