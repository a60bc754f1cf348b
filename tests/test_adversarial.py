"""The adversarial suite (`scripts/adversarial.py`): every case as one test, plus property-based
mutations (hypothesis) of a safetensors header, config.json, adapter_config.json, a .task bundle
and a weights file. Each run is a child process with a timeout; the rule is the README's: exit 0
with outputs that read back, or one `error:` line with exit 1 and nothing written, inputs untouched."""
from __future__ import annotations

import json
import os
import struct
import sys

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import adversarial as adv

CASES = adv.cases()
# Modest and without shrinking (each example is a tool run): the first failing input is reported as found.
PROPERTY = settings(max_examples=20, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The shared inputs (tiny model converted, bundled; a larger checkpoint for signals), built once."""
    folder = tmp_path_factory.mktemp("adversarial")
    adv.build_shared(folder)
    return folder


def test_suite_size_and_coverage():
    """At least 150 cases, every tool, and both refusals and acceptances for each tool."""
    assert len(CASES) >= 150
    for tool in adv.TOOLS:
        kinds = {case.expect for case in CASES if case.tool == tool}
        assert {"refuse", "accept"} <= kinds, (tool, kinds)


@pytest.fixture(scope="module")
def outcomes(request, work) -> dict:
    """The selected cases, run two at a time once for the module: id -> (status, problem)."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_case"]
    jobs = max(2, min(4, os.cpu_count() or 2))
    return {case.id: (status, problem) for case, status, problem, _ in adv.run_cases(selected, work, jobs)}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_case(case: adv.Case, outcomes):
    status, problem = outcomes[case.id]
    if status == "skip":
        pytest.skip(problem)
    assert problem is None, f"{case.id} (expected {case.expect}; area {case.area}): {problem}"


def test_checks_can_fail(work):
    """The judge itself: a traceback, a second error line, a leftover file or a changed input fail."""
    assert adv.refusal_problem(adv.Result(1, "", "Traceback (most recent call last):\nerror: x\n")) is not None
    assert adv.refusal_problem(adv.Result(1, "", "error: one\nerror: two\n")) is not None
    assert adv.refusal_problem(adv.Result(0, "", "")) is not None
    assert adv.refusal_problem(adv.Result(None, "", "")) is not None
    assert adv.refusal_problem(adv.Result(1, "", "warning: w\nerror: config.json: bad\n"), ("config.json",)) is None
    assert adv.refusal_problem(adv.Result(1, "", "error: bad\n"), ("config.json",)) is not None
    # a valid conversion during which the tokenizer (an input) is rewritten, as a clobbering tool would
    def clobber_tokenizer(c, process):
        process.join()
        c.tok.write_bytes(b"clobbered")

    clobber = adv.Case(id="convert.self-test.clobber", expect="accept", area="io", argv=adv.CONVERT,
                       during=clobber_tokenizer)
    assert "input files changed" in adv.check_case(clobber, work)
    leftover = adv.Case(id="convert.self-test.leftover", expect="refuse", area="io",
                        argv=[*adv.CONVERT, "--model-type", "NOPE"],
                        setup=adv.mkfile("{out}/.model.tflite.x.partial"))
    assert "partial" in adv.check_case(leftover, work)


# ---------------------------------------------------------------------------------------------
# Property-based: random mutations, "accept with valid output or refuse cleanly"

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


def either(case_id: str, argv: list[str], setup, outputs=(), area="ckpt") -> adv.Case:
    return adv.Case(id=case_id, argv=argv, expect="either", area=area, setup=setup, outputs=outputs,
                    timeout=adv.HANG_TIMEOUT)


def judge(case: adv.Case, work) -> None:
    problem = adv.check_case(case, work)
    assert problem is None, problem


def dump(value) -> str:
    return json.dumps(value, allow_nan=True)


@PROPERTY
@given(tensor=st.sampled_from([adv.EMBED, adv.NORM, adv.Q0]), key=st.sampled_from(["dtype", "shape", "data_offsets"]),
       value=JSON_VALUES | st.lists(st.integers(min_value=-(2**65), max_value=2**65), min_size=0, max_size=3))
def test_safetensors_header_mutations(work, tensor, key, value):
    def mutate(c):
        path = c.ckpt / "model.safetensors"
        head, data = adv.st_read(path)
        head[tensor][key] = value
        adv.st_write(path, dump(head).encode(), data)
    judge(either("convert.hypothesis.header", adv.CONVERT, mutate, adv.BASE_OUT), work)


def config_keys(path) -> list[str]:
    return sorted(json.loads(path.read_text())) + ["new_field"]


def json_mutation(where, key: str, value, delete: bool):
    """A case setup that sets (or deletes) one key of the JSON object at `where(case)`."""
    def mutate(c):
        path = where(c)
        config = json.loads(path.read_text())
        if delete:
            config.pop(key, None)
        else:
            config[key] = value
        path.write_text(dump(config))
    return mutate


@PROPERTY
@given(key=st.sampled_from(config_keys(adv.FIXTURES / "tiny-gemma" / "config.json")), value=JSON_VALUES,
       delete=st.booleans())
def test_config_json_mutations(work, key, value, delete):
    mutate = json_mutation(lambda c: c.ckpt / "config.json", key, value, delete)
    judge(either("convert.hypothesis.config", adv.CONVERT, mutate, adv.BASE_OUT, "config"), work)


@PROPERTY
@given(key=st.sampled_from(config_keys(adv.FIXTURES / "tiny-gemma-lora" / "adapter_config.json")),
       value=JSON_VALUES, delete=st.booleans())
def test_adapter_config_mutations(work, key, value, delete):
    mutate = json_mutation(lambda c: c.lora / "adapter_config.json", key, value, delete)
    judge(either("convert.hypothesis.adapter", adv.CONVERT_LORA, mutate, adv.BOTH_OUT, "adapter"), work)


@PROPERTY
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.binary(min_size=1, max_size=8)), min_size=1, max_size=4),
       tail=st.booleans())
def test_task_zip_mutations(work, edits, tail):
    """Bytes overwritten at random places of a .task, near its start (local header, flatbuffer)
    or its end (central directory): inspect describes it or refuses it."""
    def mutate(c):
        data = bytearray(c.task.read_bytes())
        for position, blob in edits:
            at = (len(data) - 200 + position % 200) if tail else position % 4096
            data[at: at + len(blob)] = blob
        c.task.write_bytes(bytes(data[: len(c.task.read_bytes())]))
    judge(either("inspect.hypothesis.task", ["{task}"], mutate, area="bundle"), work)


@PROPERTY
@given(edits=st.lists(st.tuples(st.integers(min_value=0, max_value=4095), st.sampled_from(
    [struct.pack("<I", 0x7FFFFFFF), struct.pack("<I", 0), struct.pack("<Q", 2**63 - 1), b"\xff", b"\x00"])),
    min_size=1, max_size=3))
def test_weights_flatbuffer_mutations(work, edits):
    """Flatbuffer fields of a weights file overwritten with extreme values: lora-run generates or refuses."""
    def mutate(c):
        data = bytearray(c.model.read_bytes())
        for position, blob in edits:
            data[position: position + len(blob)] = blob
        c.model.write_bytes(bytes(data))
    judge(either("run.hypothesis.weights", adv.RUN, mutate, area="run"), work)


def test_serve_answers_hostile_requests_with_4xx_json_and_keeps_serving(work):
    """One `lora-run serve` on the tiny model gets every hostile request in turn (`adv.serve_requests`):
    each answer is a 4xx with a one-line JSON message (or, for unusual but valid ones, a 200), and
    afterwards /health and a good request are still answered."""
    requests = adv.serve_requests()
    assert len(requests) >= 80 and len({r.name for r in requests}) == len(requests)
    with adv.serving(work / "shared") as url:
        assert adv.serve_problems(url, requests) == {}
        # the judge itself: a request the server answers with 200 where a 4xx is due is reported
        valid = adv.Request("valid", "/generate", b'{"inputs": "one two"}')
        assert "status 200" in adv.serve_problems(url, [valid])["valid"]
