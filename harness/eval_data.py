"""Evaluation data for `lora-run eval`: JSONL in the OpenAI / Vertex AI chat format
(`{"messages": [{"role": ..., "content": ...}]}`, the last assistant turn the reference, the turns
before it the prompt) or Alpaca (`instruction`, `input`, `output`). Every field is hostile: a line
that is not one of these is reported by its number and skipped, or refused with `strict`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from converter.errors import ConversionError
from converter.files import read_bounded

MAX_FILE_BYTES = 64 << 20
MAX_LINE_BYTES = 1 << 20
MAX_EXAMPLES = 10_000
ROLES = ("system", "user", "assistant")
JSON_TYPES = {dict: "object", list: "array", int: "number", float: "number", bool: "boolean", type(None): "null"}


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """One line's prompt turns (system, user and earlier assistant turns) and its reference answer."""

    line: int
    format: str  # "chat" or "alpaca"
    turns: tuple[Turn, ...]
    reference: str


@dataclass
class EvalData:
    examples: list[Example] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)


class BadLine(ValueError):
    """Why one line is not an example."""


def _kind(value: object) -> str:
    """What a parsed JSON value is, in JSON's words."""
    return "missing or null" if value is None else f"a JSON {JSON_TYPES.get(type(value), 'string')}"


def _string(value: object, what: str) -> str:
    """A string field, refused when it is not text the runtimes take (JSON's lone "\\ud800" escapes)."""
    if not isinstance(value, str):
        raise BadLine(f"{what} is {_kind(value)}; expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadLine(f"{what} holds a lone surrogate (U+{ord(value[exc.start]):04X}), not text") from None
    return value


def _text(value: object, what: str) -> str:
    """A message content: a string, or OpenAI's list of `{"type": "text", "text": ...}` parts."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(_string(p.get("text"), f"{what}'s text part") for p in value)
    if not isinstance(value, str):
        raise BadLine(f"{what} is {_kind(value)}; expected a string (or a list of text parts)")
    return _string(value, what)


def _chat(record: dict) -> tuple[tuple[Turn, ...], str]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadLine('"messages" must be a non-empty list')
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadLine(f"message {index} is {_kind(message)}; expected an object")
        role = message.get("role")
        if role not in ROLES:
            raise BadLine(f"message {index} has role {str(role)[:40]!r}; expected one of {', '.join(ROLES)}")
        turns.append(Turn(role, _text(message.get("content"), f"message {index}'s content")))
    last = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=None)
    if last is None:
        raise BadLine("no assistant message to compare with (the last one is the reference)")
    if not any(t.role == "user" for t in turns[:last]):
        raise BadLine("no user message before the last assistant message")
    return tuple(turns[:last]), turns[last].content


def _alpaca(record: dict) -> tuple[tuple[Turn, ...], str]:
    instruction, given, output = (_string(record.get(name, default), f'"{name}"')
                                  for name, default in (("instruction", None), ("input", ""), ("output", None)))
    prompt = f"{instruction}\n{given}" if given else instruction
    return (Turn("user", prompt),), output


def parse_line(raw: bytes, number: int) -> Example:
    """One JSONL line as an example, or BadLine saying why not."""
    if len(raw) > MAX_LINE_BYTES:
        raise BadLine(f"longer than {MAX_LINE_BYTES >> 20} MiB")
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte order mark some editors write
    except UnicodeDecodeError as exc:
        raise BadLine(f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") from None
    try:
        record = json.loads(text)
    except RecursionError:
        raise BadLine("not valid JSON (nested too deeply)") from None
    except ValueError as exc:
        raise BadLine(f"not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(record, dict):
        raise BadLine(f"a JSON {JSON_TYPES.get(type(record), 'string')}; expected an object")
    if "messages" in record:
        turns, reference = _chat(record)
        return Example(number, "chat", turns, reference)
    if "instruction" in record:
        turns, reference = _alpaca(record)
        return Example(number, "alpaca", turns, reference)
    raise BadLine('neither chat ("messages") nor Alpaca ("instruction", "output")')


def read_examples(path: Path, strict: bool = False) -> EvalData:
    """The examples of a JSONL file (blank lines ignored); bad lines skipped, or refused with `strict`."""
    data = EvalData()
    content = read_bounded(path, "DATA", MAX_FILE_BYTES)
    for number, raw in enumerate(content.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            example = parse_line(raw, number)
        except BadLine as exc:
            if strict:
                raise ConversionError(f"{path} line {number}: {exc} (--strict)") from None
            data.skipped.append((number, str(exc)))
            continue
        if len(data.examples) == MAX_EXAMPLES:
            raise ConversionError(f"{path}: more than {MAX_EXAMPLES:,} examples, the most evaluated at once; "
                                  "split the file")
        data.examples.append(example)
    if not data.examples:
        raise ConversionError(f"{path}: no examples (each line a chat or Alpaca JSON object)")
    return data
