"""`lora-run serve`: an HTTP server over one `Runtime` (a base loaded once, named adapters), with
TGI's `POST /generate` and `/generate_stream` (`parameters.adapter_id`), an OpenAI-compatible
`POST /v1/chat/completions` (`model` names the adapter, as vLLM and Workers AI do), `GET /health`
and `GET /info`.

Generation is not thread-safe (it sets torch's thread count per step), so requests run one at a
time, in arrival order, on one worker thread: each with its own adapter, never mixed. Bad requests
get a 4xx status and a JSON message (TGI's `{"error", "error_type"}`, OpenAI's `{"error": {...}}`
under /v1); the server keeps running.
"""
from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from converter.errors import ConversionError
from converter.runtime_options import INT32_MAX

from .adapters import BASE
from .generate import Options
from .inputs import check_prompt
from .runtime import Runtime
from .template import PromptTemplate

MAX_BODY = 1 << 20  # bytes of one request body
MAX_WAITING = 256  # requests queued or running at once; more are refused with 503
MAX_STOPS = 4  # stop sequences per request, as TGI's default
MAX_STOP_CHARS = 256


class Problem(Exception):
    """A request the server refuses: its HTTP status, a message for the client and TGI's error type."""

    def __init__(self, status: int, message: str, kind: str = "validation"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class _Stopped(Exception):
    """Raised from the text callback to end a generation early (a stop sequence, a gone client)."""


@dataclass
class Job:
    """One request's generation: what to run, and what the worker thread found."""

    prompt: str
    options: Options
    adapter: str | None
    stops: tuple[str, ...] = ()
    emit: Callable[[int | None, str], object] | None = None  # on the worker thread: each token's id and new text
    cancelled: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    tokens: int | None = None  # generated tokens, unknown when a stop sequence ended it
    finish: str = "eos_token"  # TGI's finish reason: eos_token, length, stop_sequence
    stop_id: int | None = None  # the stop token that ended it, when known

    def on_token(self, token: int | None, piece: str) -> None:
        """A generated token (None: a runtime that gives text only) and the text it adds."""
        if self.cancelled.is_set():
            raise _Stopped
        seen = len(self.text)
        self.text += piece
        ends = [self.text.find(stop, max(0, seen - len(stop) + 1)) for stop in self.stops]
        hits = [end + len(stop) for end, stop in zip(ends, self.stops) if end >= 0]
        if hits:
            self.text = self.text[:min(hits)]
        if self.emit:
            self.emit(token, self.text[seen:])
        if hits:
            self.finish = "stop_sequence"
            raise _Stopped


@dataclass(frozen=True)
class Settings:
    model: str  # what /info names the base
    defaults: Options  # --max-tokens (the largest KV cache a request may use), --top-k, --temperature, --random-seed
    template: PromptTemplate


class Server:
    """The runtime, one worker thread in front of it, and the HTTP routes."""

    def __init__(self, runtime: Runtime, settings: Settings):
        self.runtime, self.settings = runtime, settings
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-run-generate")
        self.waiting = 0
        self.streaming: set[asyncio.Future] = set()
        self.app = Starlette(routes=[
            Route("/generate", self.generate, methods=["POST"]),
            Route("/generate_stream", self.generate_stream, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/info", self.info, methods=["GET"]),
        ], exception_handlers={Problem: self.problem, HTTPException: self.http_exception, Exception: self.failure})

    def close(self) -> None:
        """Drop the queued jobs and wait for the running one."""
        self.worker.shutdown(cancel_futures=True)

    # --- running jobs one at a time ---

    def _work(self, job: Job) -> Job:
        try:
            generation = self.runtime.generate(job.prompt, job.options, job.adapter, on_token=job.on_token)
        except _Stopped:
            return job
        except ConversionError as exc:
            raise Problem(422, str(exc), "generation") from None
        job.text, job.tokens, job.stop_id = generation.text, len(generation.ids), generation.stop_id
        if self.runtime.prompt_tokens(job.prompt) + job.tokens >= job.options.max_tokens:
            job.finish = "length"
        return job

    async def run(self, job: Job) -> Job:
        """Queue the job for the worker thread and wait for it."""
        if self.waiting >= MAX_WAITING:
            raise Problem(503, f"{MAX_WAITING} requests are already waiting; retry later", "overloaded")
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.worker, self._work, job)
        finally:
            self.waiting -= 1

    async def stream(self, job: Job) -> AsyncIterator[tuple[int | None, str] | Job | Problem]:
        """The job's tokens (id, text) as the worker makes them, then the finished job (or its
        Problem); a client that goes away cancels it."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        job.emit = lambda token, piece: loop.call_soon_threadsafe(pieces.put_nowait, (token, piece))

        async def finish() -> None:
            try:
                result: Job | Problem = await self.run(job)
            except Problem as problem:
                result = problem
            pieces.put_nowait(result)

        task = asyncio.ensure_future(finish())
        self.streaming.add(task)  # asyncio holds tasks weakly
        task.add_done_callback(self.streaming.discard)
        try:
            while True:
                item = await pieces.get()
                yield item
                if not isinstance(item, tuple):
                    return
        finally:
            job.cancelled.set()  # a client gone: the worker stops at its next piece

    # --- requests ---

    async def body(self, request: Request) -> dict:
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise Problem(413, f"the request body is larger than {MAX_BODY >> 20} MiB")
        try:
            body = json.loads(data, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise Problem(400, f"the request body is not valid JSON ({str(exc)[:200]})") from None
        if not isinstance(body, dict):
            raise Problem(422, "the request body must be a JSON object")
        return body

    def job(self, prompt: str, adapter: str | None, params: dict, max_new: str, prompt_name: str) -> Job:
        """A job from a request's prompt, adapter name and sampling parameters (names as the API spells them)."""
        if adapter is not None and adapter != BASE and adapter not in self.runtime.adapters:
            given = ", ".join(self.runtime.adapters) or "none"
            raise Problem(404, f"no adapter named {adapter!r} (adapters: {given}; {BASE!r} for the base model)", "not_found")
        defaults = self.settings.defaults
        try:
            used = self.runtime.prompt_tokens(check_prompt(prompt, prompt_name))
        except ConversionError as exc:
            raise Problem(422, str(exc)) from None
        room = defaults.max_tokens - used
        if room < 1:
            raise Problem(422, f"{prompt_name} takes {used} tokens (start token included); the server's "
                               f"--max-tokens {defaults.max_tokens} leaves no room for output")
        new = _integer(params, max_new, 1, INT32_MAX, room)
        if new > room:
            raise Problem(422, f"{prompt_name} tokens + {max_new} must be <= {defaults.max_tokens} (the server's "
                               f"--max-tokens); given: {used} {prompt_name} tokens and {max_new} {new}")
        temperature = params.get("temperature", defaults.temperature)
        if temperature is None:
            temperature = defaults.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature < 0:
            raise Problem(422, f"temperature: expected a finite number >= 0 (0: greedy), got {_shown(temperature)}")
        options = Options(used + new, _integer(params, "top_k", 1, INT32_MAX, defaults.top_k), float(temperature),
                          _integer(params, "seed", -INT32_MAX - 1, INT32_MAX, defaults.random_seed))
        return Job(prompt, options, adapter, _stops(params.get("stop")))

    async def generate(self, request: Request) -> Response:
        job = await self.run(self.tgi_job(await self.body(request)))
        return JSONResponse({"generated_text": job.text})

    async def generate_stream(self, request: Request) -> Response:
        """TGI's server-sent events: one per generated token (its id, its text, "" while a
        character's bytes are incomplete); the last token's event also carries the whole text and
        the details, and when a stop token ended the generation, that is the last token (special)."""
        job = self.tgi_job(await self.body(request))

        async def events() -> AsyncIterator[str]:
            held: dict | None = None  # each token's event waits for the next, to know whether it is the last
            count = 0
            async for item in self.stream(job):
                if isinstance(item, Problem):
                    if held is not None:
                        yield _event(held)
                    yield _event({"error": item.message, "error_type": item.kind})
                    return
                if isinstance(item, tuple):
                    if held is not None:
                        yield _event(held)
                    count += 1
                    held = _token_event(count, *item)
                    continue
                if item.finish == "eos_token" or held is None:
                    if held is not None:
                        yield _event(held)
                    count += 1
                    held = _token_event(count, item.stop_id, "", special=True)
                sampled = item.options.temperature > 0 and item.options.top_k != 1
                yield _event({**held, "generated_text": item.text, "details": {
                    "finish_reason": item.finish, "generated_tokens": count,
                    "seed": item.options.random_seed if sampled else None,
                    "input_length": self.runtime.prompt_tokens(item.prompt)}})

        return StreamingResponse(events(), media_type="text/event-stream")

    def tgi_job(self, body: dict) -> Job:
        prompt = body.get("inputs")
        if not isinstance(prompt, str) or not prompt:
            raise Problem(422, f"inputs: expected a non-empty string, got {_shown(prompt)}")
        params = {} if body.get("parameters") is None else body["parameters"]
        if not isinstance(params, dict):
            raise Problem(422, f"parameters: expected an object, got {_shown(params)}")
        adapter = params.get("adapter_id")
        if adapter is not None and not isinstance(adapter, str):
            raise Problem(422, f"adapter_id: expected a string, got {_shown(adapter)}")
        if params.get("do_sample") is False:
            params = {**params, "temperature": 0}
        return self.job(prompt, adapter, params, "max_new_tokens", "inputs")

    async def chat(self, request: Request) -> Response:
        body = await self.body(request)
        name = body.get("model", BASE)
        if not isinstance(name, str):
            raise Problem(422, f"model: expected an adapter name or {BASE!r}, got {_shown(name)}")
        params = dict(body)
        if body.get("max_completion_tokens") is not None:
            params["max_tokens"] = body["max_completion_tokens"]
        job = self.job(self.settings.template.chat(_messages(body.get("messages"))), name, params,
                       "max_tokens", "messages")
        created, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        finish = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
        if body.get("stream") is True:
            async def events() -> AsyncIterator[str]:
                async for item in self.stream(job):
                    if isinstance(item, Problem):
                        yield _event({"error": {"message": item.message, "type": item.kind, "code": item.status}})
                        return
                    if isinstance(item, tuple) and not item[1]:
                        continue
                    delta, reason = ({"content": item[1]}, None) if isinstance(item, tuple) else ({}, finish[item.finish])
                    yield _event({"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
                                  "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        job = await self.run(job)
        text = job.text
        if job.finish == "stop_sequence":  # OpenAI leaves the stop sequence out
            text = text[:-max(len(s) for s in job.stops if text.endswith(s))]
        answer = {"id": ident, "object": "chat.completion", "created": created, "model": name,
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": finish[job.finish]}]}
        if job.tokens is not None:
            prompt = self.runtime.prompt_tokens(job.prompt)
            answer["usage"] = {"prompt_tokens": prompt, "completion_tokens": job.tokens,
                               "total_tokens": prompt + job.tokens}
        return JSONResponse(answer)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        defaults = self.settings.defaults
        return JSONResponse({"model_id": self.settings.model, "adapters": self.runtime.adapters, "base": BASE,
                             "max_total_tokens": defaults.max_tokens, "max_input_tokens": defaults.max_tokens - 1,
                             "defaults": {"top_k": defaults.top_k, "temperature": defaults.temperature,
                                          "seed": defaults.random_seed},
                             "max_stop_sequences": MAX_STOPS, "router": "lora-run"})

    # --- errors ---

    async def problem(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        if request.url.path.startswith("/v1/"):
            return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}},
                                status_code=exc.status)
        return JSONResponse({"error": exc.message, "error_type": exc.kind}, status_code=exc.status)

    async def http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return await self.problem(request, Problem(exc.status_code, f"{request.method} {request.url.path}: "
                                                                    f"{exc.detail}", "http"))

    async def failure(self, request: Request, exc: Exception) -> Response:
        """A bug: the client gets a JSON 500 (the traceback goes to the server's log)."""
        return await self.problem(request, Problem(500, f"internal error: {type(exc).__name__}: {exc}", "internal"))


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _shown(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(params: dict, name: str, low: int, high: int, default: int) -> int:
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Problem(422, f"{name}: expected an integer from {low} to {high}, got {_shown(value)}")
    return value


def _stops(value: object) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops) \
            or len(stops) > MAX_STOPS:
        raise Problem(422, f"stop: expected at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                           f"characters, got {_shown(value)}")
    return tuple(stops)


ROLES = ("system", "user", "assistant")


def _messages(value: object) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise Problem(422, f"messages: expected a non-empty list of {{role, content}} objects, got {_shown(value)}")
    turns = []
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise Problem(422, f"messages[{i}]: expected {{\"role\": one of {', '.join(ROLES)}, \"content\": a string}}, "
                               f"got {_shown(message)}")
        turns.append((role, content))
    return turns


def _token_event(index: int, token: int | None, text: str, special: bool = False) -> dict:
    """TGI's stream event for one token (logprob: not computed here)."""
    return {"index": index, "token": {"id": token, "text": text, "logprob": None, "special": special},
            "generated_text": None, "details": None, "top_tokens": None}


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: any free port); in use or not allowed is one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        reason = "is in use" if exc.errno in (98, 48) else f"cannot be used ({exc.strerror or exc})"
        raise ConversionError(f"--host {host} --port {port}: the address {reason}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def http_server(server: Server):
    """A uvicorn server for the app: `.run(sockets=[bind(...)])` serves until Ctrl-C / SIGTERM (in
    the main thread) or `.should_exit = True`."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(server.app, log_level="warning", access_log=False, lifespan="off"))
