"""The real MediaPipe web runtime: `@mediapipe/tasks-genai` in headless Chromium with WebGPU.

Chromium (Debian's build, run directly) renders WebGPU on SwiftShader, so no GPU is needed. We
start it ourselves with a DevTools port and drive it with Playwright over CDP: owning the process
means a step that overruns is ended by killing it, whatever state the page is in. A local HTTP
server on 127.0.0.1 serves the page (harness/web/), the npm package (scripts/setup_web.sh) and
the model files.

Every step has a hard timeout: the runtime can hang on a malformed file, and a hang must be a
failure with a message, never a stuck process. The runtime's defects worked around here are
listed in the README ("A LoRA that visibly works, in the real runtimes").
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from converter.runtime_options import RuntimeOptions

ROOT = Path(__file__).resolve().parent.parent
PAGE_DIR = Path(__file__).resolve().parent / "web"
WEB_DIR_VARIABLE = "LORA_WEB_DIR"


def web_dir() -> Path:
    """Where scripts/setup_web.sh's npm install is: $LORA_WEB_DIR, else the checkout's `.web/` (run from a
    source tree), else `.web/` in the current folder (an installed wheel has no checkout around it)."""
    if os.environ.get(WEB_DIR_VARIABLE):
        return Path(os.environ[WEB_DIR_VARIABLE])
    return ROOT / ".web" if (ROOT / "pyproject.toml").is_file() else Path.cwd() / ".web"


PACKAGE_DIR = web_dir() / "node_modules" / "@mediapipe" / "tasks-genai"
CHROMIUM = Path("/usr/lib/chromium/chromium")  # the binary, not the /usr/bin wrapper that adds flags
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--enable-unsafe-webgpu", "--no-first-run",
                  "--remote-debugging-port=0", "--remote-allow-origins=*"]
WARMUP_PROMPT = "hello"  # any prompt will do: see load_lora
CONTENT_TYPES = {".html": "text/html", ".mjs": "text/javascript", ".js": "text/javascript",
                 ".wasm": "application/wasm"}


class WebRuntimeError(Exception):
    """The browser or the runtime failed, refused a file, or a step ran past its timeout."""


def missing(chromium: Path = CHROMIUM, package_dir: Path = PACKAGE_DIR) -> str | None:
    """Why the web runtime cannot run here (None when it can)."""
    if not chromium.exists():
        return f"no Chromium at {chromium} (apt-get install chromium)"
    if not (package_dir / "genai_bundle.mjs").exists():
        return (f"no @mediapipe/tasks-genai at {package_dir} (bash scripts/setup_web.sh in a checkout, or set "
                f"{WEB_DIR_VARIABLE} to the folder holding its node_modules)")
    return None


class _Files:
    """URL path -> local file: the page, the npm package and the registered model files."""

    def __init__(self, package_dir: Path):
        self.roots = {"/genai/": package_dir, "/": PAGE_DIR}
        self.files: dict[str, Path] = {}

    def add(self, path: Path) -> str:
        url = f"/files/{len(self.files)}/{path.name}"
        self.files[url] = path
        return url

    def resolve(self, url_path: str) -> Path | None:
        if url_path in self.files:
            return self.files[url_path]
        if url_path == "/":
            url_path = "/index.html"
        for prefix, root in self.roots.items():
            if url_path.startswith(prefix):
                candidate = (root / url_path[len(prefix):]).resolve()
                if candidate.is_file() and candidate.is_relative_to(root.resolve()):
                    return candidate
        return None


def _handler(files: _Files) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = files.resolve(unquote(urlparse(self.path).path))
            if path is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPES.get(path.suffix, "application/octet-stream"))
            self.send_header("Content-Length", str(path.stat().st_size))
            self.end_headers()
            with open(path, "rb") as handle, contextlib.suppress(BrokenPipeError, ConnectionResetError):
                shutil.copyfileobj(handle, self.wfile, 1 << 20)

        def log_message(self, *args) -> None:
            pass

    return Handler


class _Driver:
    """Playwright's sync driver, shared: one per thread may run, and browsers connect through it."""

    def __init__(self):
        self.users = 0
        self.playwright = None

    def acquire(self):
        from playwright.sync_api import sync_playwright

        if self.users == 0:
            self.playwright = sync_playwright().start()
        self.users += 1
        return self.playwright

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            with contextlib.suppress(Exception):
                self.playwright.stop()
            self.playwright = None


_DRIVER = _Driver()


@dataclass(frozen=True)
class Timeouts:
    """Seconds per step (SwiftShader compiles shaders on first use: generations take seconds)."""

    launch: float = 60.0
    load: float = 60.0
    generate: float = 120.0


class WebRuntime:
    """One headless Chromium with the MediaPipe LLM Inference page; use as a context manager.

        with WebRuntime() as web:
            web.load_model(Path("model.bin"), RuntimeOptions(max_tokens=32, top_k=1), lora_ranks=[8])
            lora = web.load_lora(Path("lora.bin"))
            web.generate("one two three"), web.generate("one two three", lora)
    """

    def __init__(self, package_dir: Path = PACKAGE_DIR, chromium: Path = CHROMIUM, timeouts: Timeouts = Timeouts()):
        self.package_dir, self.chromium, self.timeouts = Path(package_dir), Path(chromium), timeouts
        self.console: list[str] = []
        self._files = _Files(self.package_dir)
        self._process: subprocess.Popen | None = None
        self._killed_by_timeout = False
        self._generated = False

    # -- lifetime ---------------------------------------------------------------------------------
    def __enter__(self) -> "WebRuntime":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        reason = missing(self.chromium, self.package_dir)
        if reason:
            raise WebRuntimeError(reason)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self._files))
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self._server.server_port}"
        self._profile = Path(tempfile.mkdtemp(prefix="lora-web-"))
        with self._step("starting Chromium", self.timeouts.launch), open(self._profile / "chromium.log", "wb") as log:
            self._process = subprocess.Popen(
                [str(self.chromium), *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
            port = self._devtools_port(time.monotonic() + self.timeouts.launch)
            self._playwright = _DRIVER.acquire()
            browser = self._playwright.chromium.connect_over_cdp(f"http://127.0.0.1:{port}",
                                                                 timeout=self.timeouts.launch * 1000)
            context = browser.contexts[0] if browser.contexts else browser.new_context()
            self.page = context.new_page()
            self.page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
            self.page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))
            self.page.goto(self.base_url + "/", timeout=self.timeouts.launch * 1000)
            self.page.wait_for_function("window.harnessReady === true", timeout=self.timeouts.launch * 1000)
            has_webgpu = self.page.evaluate("async () => !!(navigator.gpu && await navigator.gpu.requestAdapter())")
        if not has_webgpu:
            raise WebRuntimeError("Chromium offers no WebGPU adapter (SwiftShader missing?)")

    def _devtools_port(self, deadline: float) -> int:
        marker = self._profile / "DevToolsActivePort"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = (self._profile / "chromium.log").read_text(errors="replace")[-2000:]
                raise WebRuntimeError(f"Chromium exited with status {self._process.returncode}: {log}")
            if marker.exists() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            time.sleep(0.05)
        raise WebRuntimeError(f"Chromium did not open its DevTools port within {self.timeouts.launch:.0f} s")

    def close(self) -> None:
        """Stop the browser (our own process), the driver and the server; safe to call twice."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if getattr(self, "_playwright", None) is not None:
            _DRIVER.release()
            self._playwright = None
        if getattr(self, "_server", None) is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if getattr(self, "_profile", None) is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    # -- steps ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _step(self, what: str, seconds: float):
        """Run a step under a hard deadline: past it (plus a grace period for Playwright's own
        timeout to report) the browser process is killed, which unblocks any pending call."""
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        if self._killed_by_timeout or (self._process is not None and self._process.poll() is not None):
            raise WebRuntimeError(f"{what}: the browser is no longer running (stopped after a timeout or a crash)")
        seen = len(self.console)
        watchdog = threading.Timer(seconds + 10, self._kill_for_timeout)
        watchdog.start()
        try:
            yield
        except PlaywrightError as exc:
            if self._killed_by_timeout or isinstance(exc, PlaywrightTimeout):
                self._kill_for_timeout()  # the page may be stuck for good: later steps fail at once
                errors = [line for line in self.console[seen:] if line.startswith("pageerror: ")]
                hint = f" (last {errors[-1]})" if errors else ""
                raise WebRuntimeError(f"{what} did not finish within {seconds:.0f} s{hint}{self._console_tail()}") from None
            raise WebRuntimeError(f"{what} failed: {str(exc).splitlines()[0]}{self._console_tail()}") from None
        finally:
            watchdog.cancel()

    def kill(self) -> None:
        """Stop the browser process at once, from any thread: a step waiting on it fails at once
        (close() still has to run on the thread that drives the browser)."""
        self._kill_for_timeout()

    def _kill_for_timeout(self) -> None:
        self._killed_by_timeout = True
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def _console_tail(self) -> str:
        return ("\n  console: " + "\n  console: ".join(self.console[-8:])) if self.console else ""

    def _run(self, what: str, seconds: float, call: str, *args):
        """Start `harness.<call>(...args)` in the page and wait for its result."""
        with self._step(what, seconds):
            operation = self.page.evaluate(f"args => window.harness.{call}(...args)", list(args))
            handle = self.page.wait_for_function(
                "id => { const o = window.harness.poll(id); return o.done ? o : false; }",
                arg=operation, timeout=seconds * 1000, polling=100)
            result = handle.json_value()
        if "error" in result:
            raise WebRuntimeError(f"{what} failed: {result['error'].splitlines()[0]}{self._console_tail()}")
        return result["value"]

    # -- the runtime ------------------------------------------------------------------------------
    def serve(self, path: Path) -> str:
        """A URL for a local file (model, LoRA) on this runtime's server."""
        path = Path(path)
        if not path.is_file():
            raise WebRuntimeError(f"{path}: file not found")
        return self.base_url + self._files.add(path.resolve())

    def load_model(self, model: Path, options: RuntimeOptions, lora_ranks: list[int] | None = None) -> None:
        """LlmInference.createFromOptions on a .bin or .task (replaces the loaded one)."""
        settings = {"maxTokens": options.max_tokens, "topK": options.top_k, "temperature": options.temperature,
                    "randomSeed": options.random_seed}
        if lora_ranks and not all(isinstance(rank, int) and 1 <= rank < 2**31 for rank in lora_ranks):
            raise WebRuntimeError(f"loraRanks {lora_ranks}: expected positive 32-bit integers")
        if lora_ranks:
            settings["loraRanks"] = list(lora_ranks)
        self._generated = False
        self._run(f"loading {Path(model).name}", self.timeouts.load, "createLlm", self.serve(model), settings)

    def load_lora(self, lora: Path, warm_up: bool = True) -> str:
        """LlmInference.loadLoraModel; returns the handle to pass to generate().

        Two runtime defects are worked around here (seen with tasks-genai 0.10.29): generating
        with a LoRA loaded before the first generation crashes the wasm module ("memory access out
        of bounds"), and a LoRA first used after another one was loaded computes with the other's
        weights. So a base generation runs before the first load, and each LoRA generates once
        right after it is loaded; `warm_up=False` skips both (to test loading alone)."""
        if warm_up and not self._generated:
            self.generate(WARMUP_PROMPT)
        handle = self._run(f"loading LoRA {Path(lora).name}", self.timeouts.load, "loadLora", self.serve(lora))
        if warm_up:
            self.generate(WARMUP_PROMPT, handle)
        return handle

    def generate(self, prompt: str, lora: str | None = None) -> str:
        """generateResponse(prompt[, lora]): the response text as the runtime returns it."""
        text = self._run("generating", self.timeouts.generate, "generate", prompt, lora)
        self._generated = True
        return text


def chromium_version(chromium: Path = CHROMIUM) -> str:
    """The browser's version line, for reports."""
    return subprocess.run([str(chromium), "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
