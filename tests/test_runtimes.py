"""`lora-run --runtime litertlm|web` (and `eval`, `serve`) on the trained example: the real
runtimes give the reference runtime's greedy text for the base, the trained adapter ("hello
world", from scripts/train_tiny_lora.py's task) and a seeded random MLP adapter, switching between
them per request on one loaded base; wrong combinations and missing runtimes are one line.

One LiteRT-LM engine (GPU backend on SwiftShader Vulkan) and one browser serve most of the
module; the command-line tests start their own, as a user's command does. Skipped without
Vulkan / Chromium unless REQUIRE_RUNTIME / REQUIRE_WEB is set, as the other real-runtime tests.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from converter.errors import ConversionError
from harness.cli import main
from harness.litertlm_runtime import LiteRTLMRuntime, Timeouts
from harness.server import Server, Settings, bind, http_server, url_of
from harness.template import PromptTemplate

from .conftest import FIXTURES, ROOT
from .test_bundler import SWIFTSHADER_ICD
from .test_runtime_adapters import GREEDY, PROMPTS, alone, files  # noqa: F401 (module fixtures)
from .test_web_runtime import require_web
from .trained import MAX_TOKENS, bundle

SWITCHES = ("hello", "mlp", "hello", "base", "mlp", None, "hello")  # every change of adapter, twice


def require_vulkan() -> None:
    if not SWIFTSHADER_ICD.exists():
        message = f"no Vulkan driver at {SWIFTSHADER_ICD} (apt-get install chromium libvulkan1)"
        if os.environ.get("REQUIRE_RUNTIME"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def litertlm_file(files, tmp_path_factory) -> Path:
    return bundle(files["base"], tmp_path_factory.mktemp("litertlm") / "trained.litertlm", "litertlm")


@pytest.fixture(scope="module")
def vulkan():
    """SwiftShader as the Vulkan driver of the engines this module starts (workers inherit it)."""
    require_vulkan()
    before = os.environ.get("VK_ICD_FILENAMES")
    os.environ["VK_ICD_FILENAMES"] = str(SWIFTSHADER_ICD)
    yield
    if before is None:
        del os.environ["VK_ICD_FILENAMES"]
    else:
        os.environ["VK_ICD_FILENAMES"] = before


@pytest.fixture(scope="module")
def litertlm(files, litertlm_file, vulkan):
    with LiteRTLMRuntime(litertlm_file, GREEDY) as runtime:
        runtime.add_adapter("hello", files["hello"])
        runtime.add_adapter("mlp", files["mlp"])
        yield runtime


def cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m harness.cli ...` as a user runs it (supervised, in its own process)."""
    return subprocess.run([sys.executable, "-m", "harness.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def one_line(result, *words: str, code: int = 1) -> str:
    """One `error:` line naming the culprit, the exit status, no traceback."""
    output = result.stderr if isinstance(result, subprocess.CompletedProcess) else result.output
    status = result.returncode if isinstance(result, subprocess.CompletedProcess) else result.exit_code
    lines = output.strip().splitlines()
    assert status == code and len(lines) == 1 and lines[0].startswith("error: "), output
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


# --- LiteRT-LM ---------------------------------------------------------------------------------

@pytest.mark.runtime
def test_litertlm_switches_adapters_per_request_on_one_engine(litertlm, alone):
    """Sessions with different LoRA files (and none) on one engine give each adapter's own text."""
    worker = None
    for name in SWITCHES:
        result = litertlm.generate(PROMPTS[0], GREEDY, name)
        assert (result.ids, result.text) == alone[name or "base", PROMPTS[0]], name
        assert worker in (None, litertlm._worker)  # the engine (base) is not made again
        worker = litertlm._worker
    assert litertlm.generate(PROMPTS[1], GREEDY, "mlp").text == alone["mlp", PROMPTS[1]][1]


@pytest.mark.runtime
def test_litertlm_streams_pieces_and_stops_early_when_asked(litertlm, alone):
    pieces = []
    result = litertlm.generate(PROMPTS[0], GREEDY, None, pieces.append)
    assert "".join(pieces) == result.text == alone["base", PROMPTS[0]][1] and len(pieces) > 1

    def stop(piece: str) -> None:
        raise KeyboardInterrupt  # what a caller's callback may raise to end a generation

    with pytest.raises(KeyboardInterrupt):
        litertlm.generate(PROMPTS[0], GREEDY, "mlp", stop)
    assert litertlm.generate(PROMPTS[1], GREEDY, "hello").text == alone["hello", PROMPTS[1]][1]  # not mixed up


@pytest.mark.runtime
def test_litertlm_counts_tokens_with_the_engine_when_the_bundle_has_no_sentencepiece_model(litertlm, alone,
                                                                                             monkeypatch):
    """A .litertlm with a Hugging Face tokenizer (CPU bundles of Llama / Qwen): the engine tokenizes."""
    monkeypatch.setattr(litertlm, "tokenizer", None)
    assert litertlm.prompt_tokens(PROMPTS[0]) == len(PROMPTS[0].split()) + 1  # one piece per word, and <bos>
    result = litertlm.generate(PROMPTS[1], GREEDY, "hello")
    assert (result.ids, result.text) == alone["hello", PROMPTS[1]]


@pytest.mark.runtime
def test_litertlm_serve_answers_per_adapter_under_concurrent_requests(litertlm, alone):
    server = Server(litertlm, Settings("trained", GREEDY, PromptTemplate()))
    sock = bind("127.0.0.1", 0)
    http = http_server(server)
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.01)
    try:
        url = url_of(sock)
        requests = [(("hello", "mlp", "base")[i % 3], PROMPTS[i // 3 % 2]) for i in range(9)]

        def ask(request):
            name, prompt = request
            return httpx.post(f"{url}/generate", json={"inputs": prompt, "parameters": {"adapter_id": name}},
                              timeout=120)

        with ThreadPoolExecutor(9) as pool:
            answers = list(pool.map(ask, requests))
        for (name, prompt), answer in zip(requests, answers):
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"generated_text": alone[name, prompt][1]}, (name, prompt)
        stopped = httpx.post(f"{url}/generate", timeout=120, json={"inputs": PROMPTS[0], "parameters": {
            "adapter_id": "base", "stop": [alone["base", PROMPTS[0]][1].split()[1]]}})
        assert alone["base", PROMPTS[0]][1].startswith(stopped.json()["generated_text"])
        assert ask(("mlp", PROMPTS[1])).json() == {"generated_text": alone["mlp", PROMPTS[1]][1]}
    finally:
        http.should_exit = True
        thread.join(10)
        server.close()
        sock.close()


@pytest.mark.runtime
def test_lora_run_litertlm_prints_the_reference_text(files, litertlm_file, alone, vulkan):
    result = cli("--runtime", "litertlm", "--model", litertlm_file, "--lora", f"hello={files['hello']}", "--lora",
                 f"mlp={files['mlp']}", "--adapter", "mlp", "--prompt", PROMPTS[0], "--max-tokens", MAX_TOKENS,
                 "--temperature", 0)
    assert result.returncode == 0, result.stderr
    assert result.stdout == alone["mlp", PROMPTS[0]][1] + "\n"
    assert "tokens/s" in result.stderr.strip().splitlines()[-1]


@pytest.mark.runtime
def test_eval_on_litertlm_gives_the_adapters_scores(files, litertlm_file, vulkan):
    """fixtures/eval-hello.jsonl: lines 1-4 are the adapter's answer, 5-6 the base's counting."""
    result = subprocess.run([sys.executable, "-m", "harness.cli", "eval", str(FIXTURES / "eval-hello.jsonl"),
                             "--runtime", "litertlm", "--model", str(litertlm_file), "--lora",
                             f"hello={files['hello']}", "--max-tokens", str(MAX_TOKENS), "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    for row in document["results"]:
        expected = 1.0 if (row["line"] <= 4) == (row["adapter"] == "hello") else 0.0
        assert row["exact_match"] == expected, row
    means = {a["adapter"]: a["exact_match"] for a in document["aggregate"]}
    assert means == pytest.approx({"hello": 4 / 6, "base": 2 / 6})


@pytest.mark.runtime
def test_a_litertlm_engine_that_fails_overruns_or_dies_is_one_line_and_leaves_nothing(litertlm, litertlm_file, alone,
                                                                                     tmp_path, vulkan):
    """Last of the module's LiteRT-LM tests: it kills the shared engine's worker."""
    caches = set(Path(tempfile.gettempdir()).glob("lora-run-litertlm-*"))
    broken = tmp_path / "broken.litertlm"
    data = bytearray(litertlm_file.read_bytes())
    data[16384:16384 + 4096] = b"\xff" * 4096  # the start of the weights section (the header names its offset)
    broken.write_bytes(bytes(data))
    one_line(cli("--runtime", "litertlm", "--model", broken, "--prompt", PROMPTS[0], "--max-tokens", MAX_TOKENS),
             "LiteRT-LM ", " loading broken.litertlm")  # failed, or stopped (it may crash on such bytes)
    with LiteRTLMRuntime(litertlm_file, GREEDY, timeouts=Timeouts(start=0.01)) as runtime:
        with pytest.raises(ConversionError, match=r"^LiteRT-LM did not finish loading trained.litertlm within 0 s; "
                                                  r"stopped it$"):
            runtime.generate(PROMPTS[0], GREEDY)
        assert runtime._worker is None
    assert litertlm.generate(PROMPTS[0], GREEDY, "hello").text == alone["hello", PROMPTS[0]][1]  # its worker runs
    cache = Path(litertlm._worker.cache)
    os.kill(litertlm._worker.process.pid, signal.SIGKILL)
    with pytest.raises(ConversionError, match=r"^LiteRT-LM stopped while generating \(killed by SIGKILL\)$"):
        litertlm.generate(PROMPTS[0], GREEDY, "hello")
    assert litertlm._worker is None  # the next request starts a fresh worker
    assert set(Path(tempfile.gettempdir()).glob("lora-run-litertlm-*")) == caches - {cache}


# --- the web runtime ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def web(files):
    require_web()
    from harness.web_backend import WebBackend

    with WebBackend(files["base"], GREEDY) as runtime:
        runtime.add_adapter("hello", files["hello"])
        runtime.add_adapter("mlp", files["mlp"])
        yield runtime


@pytest.mark.web
def test_web_switches_adapters_per_request_in_one_browser(web, alone):
    """The MLP adapter's gate/up/down LoRA would otherwise apply to the attention-only one, and it
    would lose its own when another is loaded after it (README): the runtime reloads the LoRA."""
    for name in SWITCHES:
        result = web.generate(PROMPTS[0], GREEDY, name)
        assert (result.ids, result.text) == alone[name or "base", PROMPTS[0]], name
    assert web.generate(PROMPTS[1], GREEDY, "hello").text == alone["hello", PROMPTS[1]][1]


@pytest.mark.web
def test_web_takes_a_lora_file_under_1_mib(web, files, alone, tmp_path):
    """The runtime never finishes loading such a file (README); the converter pads its own, so
    this one is the hello adapter without its padding."""
    data = files["hello"].read_bytes()
    small = tmp_path / "small.bin"
    small.write_bytes(data[:-(-len(data.rstrip(b"\0")) // 64) * 64])  # zeros kept up to a 64-byte boundary
    assert small.stat().st_size < 1 << 20
    web.add_adapter("small", small)
    assert web.generate(PROMPTS[0], GREEDY, "small").text == alone["hello", PROMPTS[0]][1]


@pytest.mark.web
def test_lora_run_web_prints_the_reference_text(files, alone):
    require_web()
    result = cli("--runtime", "web", "--model", files["base"], "--lora", files["hello"], "--prompt", PROMPTS[1],
                 "--max-tokens", MAX_TOKENS, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    assert result.stdout == alone["hello", PROMPTS[1]][1] + "\n"
    assert "tokens/s" in result.stderr


# --- what cannot work --------------------------------------------------------------------------

def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_model_the_runtime_cannot_run_is_one_line(files, litertlm_file, tmp_path):
    one_line(run("--runtime", "litertlm", "--model", files["base"], "--prompt", "x"),
             str(files["base"]), "lora-bundle --format litertlm")
    one_line(run("--runtime", "litertlm", "--backend", "cpu", "--model", litertlm_file, "--prompt", "x"),
             "holds GPU weights", "use --backend gpu")
    task = bundle(files["base"], tmp_path / "trained.task")
    one_line(run("--runtime", "web", "--model", task, "--prompt", "x"), str(task), "give the base .bin")
    one_line(run("--runtime", "web", "--model", litertlm_file, "--prompt", "x"), str(litertlm_file))
    one_line(run("serve", "--runtime", "litertlm", "--model", files["base"], "--port", 0), "lora-bundle --format litertlm")


def test_options_that_do_not_go_together_are_one_line(files):
    one_line(run("--backend", "cpu", "--model", files["base"], "--prompt", "x"), "--backend cpu", "--runtime litertlm")
    one_line(run("--runtime", "web", "--compare", "--model", files["base"], "--prompt", "x"), "--compare")
    one_line(run("--runtime", "web", "--tokenizer", files["base"], "--model", files["base"], "--prompt", "x"),
             "--tokenizer")
    one_line(run("eval", FIXTURES / "eval-hello.jsonl", "--backend", "gpu", "--model", files["base"]), "--backend gpu")
    assert run("--runtime", "vllm", "--model", files["base"], "--prompt", "x").exit_code == 2


def test_a_runtime_that_is_not_installed_says_what_to_install(files, litertlm_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "litert_lm", None)  # import litert_lm raises ImportError
    one_line(run("--runtime", "litertlm", "--model", litertlm_file, "--prompt", "x"),
             "pip install 'lora-convert[litertlm]'")
    monkeypatch.setitem(sys.modules, "playwright", None)
    one_line(run("--runtime", "web", "--model", files["base"], "--prompt", "x"), "pip install 'lora-convert[web]'")
    monkeypatch.delitem(sys.modules, "playwright")
    monkeypatch.setattr("harness.web_runtime.PACKAGE_DIR", Path("/nonexistent"))
    one_line(run("--runtime", "web", "--model", files["base"], "--prompt", "x"), "scripts/setup_web.sh")
