"""The prompt template a chat is joined with: `--prompt-prefix/--prompt-suffix`, else the .task
bundle's (its METADATA's prompt template) or the .litertlm bundle's (its LlmMetadata's prompt
templates), as MediaPipe LLM Inference and LiteRT-LM wrap each user turn."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bundler.cli import unescape
from bundler.litertlm import read_llm_metadata
from bundler.task import TaskFile, file_kind
from converter.errors import ConversionError
from converter.files import regular_file


@dataclass(frozen=True)
class PromptTemplate:
    system: str = ""  # the session prefix, before the first turn
    prefix: str = ""  # before each user turn
    suffix: str = ""  # after each user turn (the model's turn starts here)

    def chat(self, messages: list[tuple[str, str]]) -> str:
        """(role, content) turns as one prompt: system turns as they are, the template's session
        prefix before the first turn when no system turn is given, user turns wrapped in the
        prefix and suffix, assistant turns as they are."""
        parts = [] if any(role == "system" for role, _ in messages) else [self.system]
        for role, content in messages:
            parts.append(self.prefix + content + self.suffix if role == "user" else content)
        return "".join(parts)


def template_of(model: Path, prefix: str | None, suffix: str | None) -> PromptTemplate:
    """The given prefix/suffix (shell-typed `\\n` unescaped as `lora-bundle` does), else the
    template of a .task or .litertlm model, else none."""
    if prefix is not None or suffix is not None:
        return PromptTemplate("", unescape(prefix) or "", unescape(suffix) or "")
    kind = file_kind(regular_file(model, "--model"))
    if kind == "litertlm":
        return litertlm_template(model)
    if kind != "task":
        return PromptTemplate()
    template = TaskFile(model).metadata().prompt_template
    return PromptTemplate(template.session_prefix, template.prompt_prefix, template.prompt_suffix)


def litertlm_template(model: Path) -> PromptTemplate:
    """A .litertlm's LlmMetadata prompt templates as `lora-bundle` writes them (system prefix: the
    session prefix; user prefix and suffix); the model prefix, where a bundle has one, starts the
    model's turn after the user suffix. A Jinja template alone is not rendered here: one line
    asking for the prefix and suffix."""
    metadata = read_llm_metadata(model)
    templates = metadata.prompt_templates
    if not metadata.HasField("prompt_templates") and metadata.HasField("jinja_prompt_template"):
        raise ConversionError(f"--model {model}: its prompt template is a Jinja template, which lora-run does not "
                              "render; give --prompt-prefix and --prompt-suffix")
    return PromptTemplate(templates.system.prefix, templates.user.prefix, templates.user.suffix + templates.model.prefix)
