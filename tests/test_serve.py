"""`lora-run serve` with a real HTTP client on the trained example: the adapter answers "hello
world", a seeded random MLP adapter something else, the base counts on (tests/test_runtime_adapters.py);
under concurrent requests over several names each must give exactly its separate run's text."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import sentencepiece as spm

from bundler.task import METADATA_ENTRY, MODEL_ENTRY, TOKENIZER_ENTRY, bundle_metadata, write_zip
from harness.runtime import ReferenceRuntime
from harness.server import Job, Server, Settings, bind, http_server, url_of
from harness.template import PromptTemplate, template_of

from .conftest import ROOT
from .test_runtime_adapters import GREEDY, PROMPTS, alone, files  # noqa: F401 (module fixtures)
from .trained import TRAINED_TOKENIZER

NAMES = ("hello", "hello2", "mlp", "base")  # hello2: the hello adapter's file under another name
EXPECTED_OF = {"hello": "hello", "hello2": "hello", "mlp": "mlp", "base": "base"}


@pytest.fixture(scope="module")
def url(files):
    """The server on a free loopback port, in a thread of this process."""
    with ReferenceRuntime(files["base"]) as runtime:
        for name in NAMES[:-1]:
            runtime.add_adapter(name, files[EXPECTED_OF[name]])
        server = Server(runtime, Settings("trained", GREEDY, PromptTemplate()))
        sock = bind("127.0.0.1", 0)
        http = http_server(server)
        thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not http.started:
            time.sleep(0.01)
        yield url_of(sock)
        http.should_exit = True
        thread.join(10)
        server.close()
        sock.close()


def generate(url: str, prompt: str, name: str, **parameters) -> httpx.Response:
    return httpx.post(f"{url}/generate", json={"inputs": prompt, "parameters": {"adapter_id": name, **parameters}},
                      timeout=60)


def test_each_name_gives_its_own_answer_under_concurrent_requests(url, alone):
    requests = [(NAMES[i % 4], PROMPTS[i // 4 % 2]) for i in range(40)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda request: generate(url, request[1], request[0]), requests))
    for (name, prompt), answer in zip(requests, answers):
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"generated_text": alone[EXPECTED_OF[name], prompt][1]}, (name, prompt)
    assert {alone[EXPECTED_OF[n], PROMPTS[0]][1] for n in NAMES} == {alone[n, PROMPTS[0]][1] for n in ("hello", "mlp", "base")}
    assert len({alone[n, PROMPTS[0]][1] for n in ("hello", "mlp", "base")}) == 3  # mixing would show


def events(response: httpx.Response) -> list[dict]:
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]


def test_the_stream_gives_tgi_events_with_the_token_ids_of_a_separate_run(url, alone):
    tokenizer = spm.SentencePieceProcessor(model_file=str(TRAINED_TOKENIZER))
    prompt_length = 1 + len(tokenizer.encode(PROMPTS[0]))
    endings = set()
    for name in NAMES:
        response = httpx.post(f"{url}/generate_stream", timeout=60,
                              json={"inputs": PROMPTS[0], "parameters": {"adapter_id": name}})
        sent = events(response)
        ids, text = alone[EXPECTED_OF[name], PROMPTS[0]]
        # the base counts until the KV cache is full; the adapters say hello and stop at <eos>, which
        # TGI sends as a last, special token
        length = prompt_length + len(ids) == GREEDY.max_tokens
        endings.add(length)
        tokens = sent if length else sent[:-1]
        assert [event["token"]["id"] for event in tokens] == ids and [e["index"] for e in sent] == \
            list(range(1, len(sent) + 1))
        for i, event in enumerate(tokens):  # each token's text is what it adds to the decoded text
            assert event["token"]["text"] == tokenizer.decode(ids[:i + 1])[len(tokenizer.decode(ids[:i])):]
            assert event["token"]["special"] is False
        assert all(event["generated_text"] is None is event["details"] for event in sent[:-1])
        last = sent[-1]
        assert "".join(event["token"]["text"] for event in tokens) == text == last["generated_text"]
        if not length:
            assert last["token"] == {"id": tokenizer.piece_to_id("<eos>"), "text": "", "logprob": None, "special": True}
        assert last["details"] == {"finish_reason": "length" if length else "eos_token", "generated_tokens": len(sent),
                                   "seed": None, "input_length": prompt_length}
        assert generate(url, PROMPTS[0], name).json()["generated_text"] == text
    assert endings == {True, False}  # both kinds of end were seen


def test_a_tgi_client_reads_the_stream(url, alone):
    """huggingface_hub's TGI client parses every event (its token ids are integers, not null)."""
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=f"{url}/generate_stream", timeout=60)
    ids, text = alone["base", PROMPTS[0]]
    outputs = list(client.text_generation(PROMPTS[0], stream=True, details=True, max_new_tokens=3))
    assert [o.token.id for o in outputs] == ids[:3] and "".join(o.token.text for o in outputs) == " ".join(text.split()[:3])
    assert outputs[-1].details.finish_reason == "length" and outputs[-1].generated_text == " ".join(text.split()[:3])


def test_parameters_stop_sequence_and_max_new_tokens(url, alone):
    base = alone["base", PROMPTS[0]][1]  # "four five six ..."
    assert generate(url, PROMPTS[0], None, stop=["five"]).json()["generated_text"] == "four five"
    assert generate(url, PROMPTS[0], "base", max_new_tokens=2).json()["generated_text"] == " ".join(base.split()[:2])
    sampled = [generate(url, PROMPTS[0], "mlp", temperature=1.5, top_k=40, seed=s).json()["generated_text"]
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # seeded


def test_chat_completions_model_names_the_adapter(url, alone):
    def chat(model, **extra):
        return httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"model": model, "messages": [{"role": "user", "content": PROMPTS[1]}], **extra})

    for name in NAMES:
        answer = chat(name).json()
        assert answer["object"] == "chat.completion" and answer["model"] == name
        assert answer["choices"][0]["message"] == {"role": "assistant", "content": alone[EXPECTED_OF[name], PROMPTS[1]][1]}
        assert answer["usage"]["completion_tokens"] == len(alone[EXPECTED_OF[name], PROMPTS[1]][0])
    assert chat("base", stop="six").json()["choices"][0]["message"]["content"] == "five "  # the stop sequence left out
    chunks = events(chat("hello", stream=True))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "hello world"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    refused = chat("nope")
    assert refused.status_code == 404 and "no adapter named 'nope'" in refused.json()["error"]["message"]


def test_a_stop_sequence_over_two_pieces_ends_the_text_there_and_a_cancelled_job_stops():
    shown: list[tuple[int | None, str]] = []
    job = Job("p", GREEDY, None, stops=("xyz", "five six"), emit=lambda *token: shown.append(token))
    job.on_token(7, "four fi")
    job.on_token(8, "")  # a token whose character is not complete yet
    with pytest.raises(Exception) as stopped:
        job.on_token(9, "ve six seven")
    assert job.text == "four five six" and job.finish == "stop_sequence"
    assert shown == [(7, "four fi"), (8, ""), (9, "ve six")]
    job = Job("p", GREEDY, None)
    job.cancelled.set()
    with pytest.raises(type(stopped.value)):
        job.on_token(1, "a")


def test_a_client_leaving_a_stream_early_leaves_the_server_answering(url, alone):
    with httpx.stream("POST", f"{url}/generate_stream", json={"inputs": PROMPTS[0]}, timeout=60) as response:
        assert next(response.iter_lines()).startswith("data: ")
    assert generate(url, PROMPTS[0], "mlp").json()["generated_text"] == alone["mlp", PROMPTS[0]][1]


def test_health_and_info(url):
    assert httpx.get(f"{url}/health").status_code == 200
    info = httpx.get(f"{url}/info").json()
    assert info["adapters"] == ["hello", "hello2", "mlp"] and info["max_total_tokens"] == GREEDY.max_tokens


BAD = [
    ("/generate", b'{"inputs": "one two', 400, "not valid JSON"),
    ("/generate", b"NaN", 400, "NaN is not a JSON number"),
    ("/generate", b"[1, 2]", 422, "must be a JSON object"),
    ("/generate", b'{"parameters": {}}', 422, "inputs: expected a non-empty string"),
    ("/generate", b'{"inputs": "one", "parameters": []}', 422, "parameters: expected an object"),
    ("/generate", b'{"inputs": "one", "parameters": {"adapter_id": "nope"}}', 404, "no adapter named 'nope'"),
    ("/generate", b'{"inputs": "one", "parameters": {"adapter_id": 3}}', 422, "adapter_id: expected a string"),
    ("/generate", b'{"inputs": "one", "parameters": {"max_new_tokens": 100}}', 422, "max_new_tokens must be <= 16"),
    ("/generate", b'{"inputs": "one", "parameters": {"max_new_tokens": 0}}', 422, "max_new_tokens: expected an integer"),
    ("/generate", b'{"inputs": "one", "parameters": {"top_k": "x"}}', 422, "top_k: expected an integer"),
    ("/generate", b'{"inputs": "one", "parameters": {"seed": 1e40}}', 422, "seed: expected an integer"),
    ("/generate", b'{"inputs": "one", "parameters": {"temperature": -1}}', 422, "temperature: expected"),
    ("/generate", b'{"inputs": "one", "parameters": {"stop": [1]}}', 422, "stop: expected"),
    ("/generate", b'{"inputs": "' + b"one " * 40 + b'"}', 422, "leaves no room for output"),
    ("/generate", b'{"inputs": "\\ud800"}', 422, "not valid UTF-8"),
    ("/generate", b"[" * 100000, 400, "not valid JSON"),
    ("/generate", b" " * (2 << 20), 413, "larger than 1 MiB"),
    ("/generate_stream", b'{"inputs": "one", "parameters": {"adapter_id": "nope"}}', 404, "no adapter named"),
    ("/v1/chat/completions", b'{"model": "base", "messages": [{"role": "bot", "content": "x"}]}', 422, "messages[0]"),
    ("/v1/chat/completions", b'{"model": 1, "messages": []}', 422, "model: expected"),
    ("/nowhere", b"{}", 404, "Not Found"),
    ("/health", b"{}", 405, "Method Not Allowed"),
]


@pytest.mark.parametrize("path, body, status, message", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_bad_requests_are_4xx_json_and_the_server_keeps_answering(url, alone, path, body, status, message):
    response = httpx.post(f"{url}{path}", content=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in (error["message"] if path.startswith("/v1/") else error)
    assert generate(url, PROMPTS[0], "hello").json()["generated_text"] == alone["hello", PROMPTS[0]][1]


def test_chat_template_from_options_or_task(files, tmp_path):
    template = template_of(files["base"], "<u>\\n", "</u>")
    assert template == PromptTemplate("", "<u>\n", "</u>")
    assert template.chat([("user", "a"), ("assistant", "b"), ("user", "c")]) == "<u>\na</u>b<u>\nc</u>"
    assert template_of(files["base"], None, None) == PromptTemplate()
    task = tmp_path / "m.task"
    write_zip(task, [(MODEL_ENTRY, files["base"]), (TOKENIZER_ENTRY, TRAINED_TOKENIZER),
                     (METADATA_ENTRY, bundle_metadata("<bos>", ["<eos>"], False, "S:", "<u>", "</u>"))])
    template = template_of(task, None, None)
    assert template.chat([("user", "a")]) == "S:<u>a</u>"
    assert template.chat([("system", "T:"), ("user", "a")]) == "T:<u>a</u>"


def serve_command(*args) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "serve", *map(str, args)]


def test_the_command_prints_its_url_serves_and_stops_on_ctrl_c(files):
    process = subprocess.Popen(serve_command("--model", files["base"], "--lora", f"hello={files['hello']}",
                                             "--port", 0, "--max-tokens", 16, "--temperature", 0),
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), process.stderr.read() if process.poll() is not None else url
        assert httpx.get(f"{url}/info").json()["adapters"] == ["hello"]
        assert generate(url, PROMPTS[0], "hello").json()["generated_text"] == "hello world"
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0 and "Traceback" not in stderr and stderr.rstrip().endswith("stopped")


def test_a_port_in_use_is_one_line(files):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(serve_command("--model", files["base"], "--port", port),
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: --host 127.0.0.1 --port {port}: the address is in use\n"
