"""`--runtime litertlm`: Google's LiteRT-LM engine (`pip install 'lora-convert[litertlm]'`) on a
`.litertlm` bundle, `--backend gpu` (our GPU weights, `lora-bundle --format litertlm`) or
`--backend cpu` (prefill/decode graphs), each LoRA `.bin` given to the session it generates in.

The engine runs in a worker process (harness/litertlm_worker.py): its native code can abort or
hang, so every answer has a deadline, past which the worker is killed, and a worker that dies is
one line naming what it was doing. One engine serves every adapter: each generation opens a
session with its adapter's LoRA (or none), so switching never reloads the base.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from bundler.litertlm import model_types, sentencepiece_model
from bundler.task import file_kind
from converter.errors import ConversionError
from converter.files import regular_file
from converter.tflite import WeightFile
from converter.tokenizer import parse_sentencepiece

from .generate import Generation, Options, check_room
from .runtime import OnText, Runtime

INSTALL = "pip install 'lora-convert[litertlm]'"
MODEL_TYPES = {"gpu": "tf_lite_artisan_text_decoder", "cpu": "tf_lite_prefill_decode"}
WHAT = {"tf_lite_artisan_text_decoder": "GPU weights", "tf_lite_prefill_decode": "prefill/decode graphs"}
NOISE = ("XDG_RUNTIME_DIR",)  # stderr lines of the GPU stack that say nothing about the failure


@dataclass(frozen=True)
class Timeouts:
    """Seconds the worker may take: to make the engine, and per answer while generating (the first
    piece includes compiling the GPU shaders: about 20 s for a tiny model on SwiftShader)."""

    start: float = 300.0
    answer: float = 600.0


def check_model(model: Path, backend: str) -> Path:
    """A .litertlm whose model section the backend runs; anything else is one line saying what to give."""
    regular_file(model, "--model")
    kind = file_kind(model)
    if kind != "litertlm":
        what = "a .task bundle" if kind == "task" else "not a .litertlm bundle"
        raise ConversionError(f"--model {model}: --runtime litertlm takes a .litertlm bundle, this is {what}; make one "
                              "with lora-bundle --format litertlm --tflite-model BASE.bin ... (a .bin runs with --runtime "
                              "reference or web, a .task with reference)")
    types = model_types(model)
    if MODEL_TYPES[backend] not in types:
        held = ", ".join(WHAT.get(t, t) for t in types) or "no model section"
        other = [name for name, t in MODEL_TYPES.items() if t in types]
        hint = f"; use --backend {other[0]}" if other else ""
        raise ConversionError(f"--model {model} holds {held}, which --backend {backend} cannot run{hint}")
    return model


class LiteRTLMRuntime(Runtime[Path]):
    """A .litertlm on LiteRT-LM's engine in a worker process, started at the first request (its
    LoRA rank must cover every adapter; one added later with a higher rank restarts it)."""

    def __init__(self, model: Path, options: Options, backend: str = "gpu", timeouts: Timeouts = Timeouts()):
        super().__init__()
        try:
            import litert_lm  # noqa: F401  (only to say what to install, before any work)
        except ImportError:
            raise ConversionError(f"--runtime litertlm needs LiteRT-LM's Python API: {INSTALL}") from None
        self.model, self.backend = check_model(Path(model), backend), backend
        self.options, self.timeouts = options, timeouts
        blob = sentencepiece_model(self.model)  # else a Hugging Face tokenizer: the engine tokenizes (_ids)
        self.tokenizer = parse_sentencepiece(blob, f"{model}: its tokenizer section") if blob else None
        self._lock = threading.RLock()  # one request at a time on the worker's pipes
        self._worker: _Worker | None = None
        self._rank = 0
        self._lora_applied = False  # whether the worker's engine has run a session with a LoRA

    def _started(self) -> _Worker:
        """The worker, started (and its engine made) when there is none."""
        if self._worker is None:
            self._worker = _Worker(self.model, self.backend, self.options.max_tokens, self._rank)
            try:
                self._read(f"loading {self.model.name}", self.timeouts.start)
            except ConversionError:
                self.close()
                raise
        return self._worker

    def _send(self, **request) -> None:
        self._started().send(request)

    def _read(self, what: str, seconds: float) -> dict:
        """The worker's next answer; one line and a stopped worker if it dies, fails or overruns."""
        worker = self._started()
        try:
            answer = worker.read(seconds)
        except TimeoutError:
            self.close()
            raise ConversionError(f"LiteRT-LM did not finish {what} within {seconds:.0f} s; stopped it") from None
        except EOFError:
            how = worker.death()
            self.close()
            raise ConversionError(f"LiteRT-LM stopped while {what} ({how})") from None
        if "error" in answer:
            raise ConversionError(f"LiteRT-LM failed {what}: {answer['error']}")
        return answer

    def close(self) -> None:
        self._lora_applied = False
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    # -- the runtime ------------------------------------------------------------------------------
    def prompt_tokens(self, prompt: str) -> int:
        return 1 + len(self._ids(prompt))  # the engine puts the start token before the prompt's

    def _ids(self, text: str) -> list[int]:
        """The text's token ids: by the bundle's SentencePiece model, else by the engine (which then
        answers after the generation under way, if any)."""
        if self.tokenizer is not None:
            return self.tokenizer.encode(text)
        with self._lock:
            self._send(tokenize=text)
            return self._read("tokenizing", self.timeouts.answer)["ids"]

    def _load_adapter(self, path: Path) -> Path:
        rank = WeightFile(regular_file(path, "--lora")).lora_rank
        if rank is None:
            raise ConversionError(f"--lora {path}: a base model's weights file, not a LoRA weights file")
        if rank > self._rank:
            self._rank = rank
            self.close()  # the engine's LoRA rank is set when it is made
        return path.resolve()

    def _generate(self, prompt: str, options: Options, adapter: Path | None, on_text: OnText | None) -> Generation:
        with self._lock:
            return self._generate_alone(prompt, options, adapter, on_text)

    def _generate_alone(self, prompt: str, options: Options, adapter: Path | None, on_text: OnText | None) -> Generation:
        if options.max_tokens > self.options.max_tokens:
            raise ConversionError(f"--max-tokens {options.max_tokens}: more than the {self.options.max_tokens} "
                                  "the engine was made with")
        used = self.prompt_tokens(prompt)
        check_room(used, options)
        if adapter is None and self._lora_applied and self.backend == "cpu":
            # LiteRT-LM's CPU executor (0.18) keeps applying the last LoRA it loaded to later sessions
            # that name none: the base gets a fresh engine.
            self.close()
        self._started()  # made before the clock starts: tokens/s counts the generation alone
        self._lora_applied = self._lora_applied or adapter is not None
        start = time.perf_counter()
        self._send(generate=prompt, lora=str(adapter) if adapter else None, top_k=options.top_k,
                   temperature=options.temperature, seed=options.random_seed, max_new=options.max_tokens - used)
        text, failure = "", None
        try:
            while "done" not in (answer := self._read("generating", self.timeouts.answer)):
                text += answer["piece"]
                if on_text is not None and failure is None:
                    try:
                        on_text(answer["piece"])
                    except BaseException as exc:  # the caller ends it (serve: a stop sequence, a gone client)
                        failure = exc
                        self._send(cancel=True)  # and the rest of the answer is read, so the next one is its own
        except BaseException:
            self.close()  # cut off mid-answer (a signal, a dead worker): the next request starts a fresh worker
            raise
        if failure is not None:
            raise failure
        # LiteRT-LM reports text, not token ids: the output's ids are its text tokenized again.
        return Generation(self._ids(text) if text else [], text, time.perf_counter() - start)


class _Worker:
    """A worker process (harness/litertlm_worker.py): its pipes, its stderr (a file, for the last
    line it wrote) and the engine's cache folder, all removed by `close`."""

    def __init__(self, model: Path, backend: str, max_tokens: int, rank: int):
        self.stderr = tempfile.TemporaryFile()
        self.cache = tempfile.mkdtemp(prefix="lora-run-litertlm-")
        command = [sys.executable, "-m", "harness.litertlm_worker", str(model.resolve()), backend, str(max_tokens),
                   str(rank), self.cache]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        cwd=Path(__file__).resolve().parent.parent)
        self.stdin, self.stdout = cast(IO[bytes], self.process.stdin), cast(IO[bytes], self.process.stdout)
        self.buffer = b""

    def send(self, request: dict) -> None:
        try:
            self.stdin.write((json.dumps(request) + "\n").encode())
            self.stdin.flush()
        except BrokenPipeError:
            pass  # it died: the next read says how

    def read(self, seconds: float) -> dict:
        """The next answer; TimeoutError past `seconds`, EOFError if the worker is gone."""
        deadline = time.monotonic() + seconds
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.stdout], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.stdout.fileno(), 1 << 16)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def death(self) -> str:
        """How the worker ended, with the last line it wrote on stderr."""
        code = self.process.wait()
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        self.stderr.seek(0)
        lines = [line.strip() for line in self.stderr.read().decode("utf-8", "replace").splitlines()
                 if line.strip() and not any(noise in line for noise in NOISE)]
        return f"{how}: {lines[-1][:300]}" if lines else how

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.stdin.close()
        self.stdout.close()
        self.stderr.close()
        shutil.rmtree(self.cache, ignore_errors=True)
