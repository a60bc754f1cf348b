"""`lora-run eval`'s work: each model file loaded once, greedy generation for every example with
the base and with each adapter, scored against the references; per model and adapter the mean
scores, and how much every model after the first differs from it (int8 vs int4 of one base).
An example that cannot be generated (its prompt does not fit --max-tokens, ...) scores zero and
says why, or, with `strict`, ends the evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from converter.errors import ConversionError
from converter.runtime_options import RuntimeOptions as Options

from .adapters import BASE
from .eval_data import Example
from .metrics import METRICS, Scores, score
from .template import template_of


@dataclass(frozen=True)
class Result:
    line: int
    model: str
    adapter: str
    output: str
    scores: Scores
    error: str | None = None  # why this generation failed (then output is empty and scores are zero)


@dataclass
class Evaluation:
    models: list[str]
    adapters: list[str]  # BASE first
    results: list[Result] = field(default_factory=list)

    def of(self, model: str, adapter: str) -> list[Result]:
        return [r for r in self.results if r.model == model and r.adapter == adapter]

    def mean(self, model: str, adapter: str) -> dict[str, float]:
        results = self.of(model, adapter)
        return {m: sum(getattr(r.scores, m) for r in results) / len(results) for m in METRICS}

    def failures(self) -> list[Result]:
        return [r for r in self.results if r.error is not None]

    def differences(self) -> list[dict]:
        """For each later model and adapter: its mean scores minus the first model's, and on how many
        examples its output is not the first model's."""
        first = self.models[0]
        rows = []
        for model in self.models[1:]:
            for adapter in self.adapters:
                ours, theirs = self.mean(model, adapter), self.mean(first, adapter)
                changed = sum(a.output != b.output for a, b in zip(self.of(model, adapter), self.of(first, adapter)))
                rows.append({"model": model, "reference_model": first, "adapter": adapter,
                             **{m: ours[m] - theirs[m] for m in METRICS}, "changed_outputs": changed})
        return rows


def model_labels(models: list[Path]) -> list[str]:
    """Short names for the model files: their file names, or their paths where two share a name."""
    names = [m.name for m in models]
    return [m.name if names.count(m.name) == 1 else str(m) for m in models]


FAILED = Scores(0.0, 0.0, 0.0)


def evaluate(models: list[Path], adapters: list[tuple[str, Path]], examples: list[Example], max_tokens: int,
             prefix: str | None, suffix: str | None, step: Callable[[Result], object] = lambda result: None,
             strict: bool = False, runtime: str = "reference", backend: str | None = None) -> Evaluation:
    """Greedy generation for every model, adapter (the base first) and example on the chosen runtime;
    `step(result)` after each. A generation that fails is a zero-scored result with its error (with
    `strict`: refused); if every one fails, the first failure is refused."""
    from .runtimes import open_runtime

    options = Options(max_tokens, top_k=1, temperature=0.0)
    evaluation = Evaluation(model_labels(models), [BASE] + [name for name, _ in adapters])
    for model, label in zip(models, evaluation.models):
        template = template_of(model, prefix, suffix)
        with open_runtime(runtime, backend, model, None, options) as running:
            for name, path in adapters:
                running.add_adapter(name, path)
            for adapter in evaluation.adapters:
                for example in examples:
                    prompt = template.chat([(turn.role, turn.content) for turn in example.turns])
                    try:
                        output = running.generate(prompt, options, adapter).text
                    except ConversionError as exc:
                        if strict:
                            raise ConversionError(f"line {example.line} ({label}, {adapter}): {exc} (--strict)") from None
                        result = Result(example.line, label, adapter, "", FAILED, str(exc))
                    else:
                        result = Result(example.line, label, adapter, output, score(output, example.reference))
                    evaluation.results.append(result)
                    step(result)
    failures = evaluation.failures()
    if failures and len(failures) == len(evaluation.results):
        first = failures[0]
        raise ConversionError(f"no example could be generated; line {first.line} ({first.model}, {first.adapter}): "
                              f"{first.error}")
    return evaluation
