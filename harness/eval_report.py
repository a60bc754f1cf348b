"""`lora-run eval`'s outputs: a terminal table, a JSON document, and a self-contained HTML report
with an inline SVG bar chart of the mean scores per model and adapter."""
from __future__ import annotations

import html

from .eval_data import EvalData
from .evaluate import Evaluation
from .metrics import METRICS

TITLES = {"exact_match": "exact match", "f1": "token F1", "rouge_l": "ROUGE-L"}
COLORS = {"exact_match": "#4e79a7", "f1": "#f28e2b", "rouge_l": "#59a14f"}
SHOWN = 40  # characters of an output the terminal table shows


def as_json(evaluation: Evaluation, data: EvalData) -> dict:
    """The machine-readable result: per example, aggregate, differences between models, skipped lines."""
    return {
        "models": evaluation.models,
        "adapters": evaluation.adapters,
        "examples": [{"line": e.line, "format": e.format, "reference": e.reference} for e in data.examples],
        "results": [{"line": r.line, "model": r.model, "adapter": r.adapter, "output": r.output,
                     **{m: getattr(r.scores, m) for m in METRICS}, "error": r.error} for r in evaluation.results],
        "aggregate": [{"model": model, "adapter": adapter, "examples": len(evaluation.of(model, adapter)),
                       "failed": sum(r.error is not None for r in evaluation.of(model, adapter)),
                       **evaluation.mean(model, adapter)}
                      for model in evaluation.models for adapter in evaluation.adapters],
        "differences": evaluation.differences(),
        "skipped": [{"line": line, "error": why} for line, why in data.skipped],
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header] + rows]


def _shown(text: str) -> str:
    text = repr(text)[1:-1]  # one line, control characters visible
    return text if len(text) <= SHOWN else text[:SHOWN - 3] + "..."


def _output(result: dict) -> str:
    """The output column: the generated text, or why there is none."""
    return _shown(result["output"]) if result["error"] is None else "FAILED: " + _shown(result["error"])


def as_text(document: dict) -> str:
    """Readable tables: every example's scores, the means, and the differences between models."""
    many = len(document["models"]) > 1
    lines = ["Per example:"]
    lines += _table(["line"] + (["model"] if many else []) + ["adapter", "EM", "F1", "ROUGE-L", "output"],
                    [[str(r["line"])] + ([r["model"]] if many else []) + [r["adapter"]]
                     + [f"{r[m]:.2f}" for m in METRICS] + [_output(r)] for r in sorted(document["results"], key=lambda r: r["line"])])
    lines += ["", "Mean over examples (a failed generation scores 0):"]
    lines += _table((["model"] if many else []) + ["adapter", "examples", "failed", "EM", "F1", "ROUGE-L"],
                    [([a["model"]] if many else []) + [a["adapter"], str(a["examples"]), str(a["failed"])]
                     + [f"{a[m]:.3f}" for m in METRICS] for a in document["aggregate"]])
    if document["differences"]:
        lines += ["", f"Difference from {document['models'][0]} (positive: better):"]
        lines += _table(["model", "adapter", "EM", "F1", "ROUGE-L", "outputs changed"],
                        [[d["model"], d["adapter"]] + [f"{d[m]:+.3f}" for m in METRICS]
                         + [f"{d['changed_outputs']}/{len(document['examples'])}"] for d in document["differences"]])
    if document["skipped"]:
        lines += ["", f"Skipped lines: {', '.join(str(s['line']) for s in document['skipped'])}"]
    return "\n".join(lines)


def _chart(aggregate: list[dict], many: bool) -> str:
    """Grouped bars: one group per model and adapter, one bar per metric, scores from 0 to 1."""
    bar, gap, height, top, left = 18, 24, 200, 30, 40
    group = bar * len(METRICS) + gap
    width = max(left + group * len(aggregate) + gap, left + 110 * len(METRICS))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + height + 60}" '
             f'style="overflow:visible" role="img" aria-label="mean scores per model and adapter">']
    for tick in (0, 0.5, 1):
        y = top + height * (1 - tick)
        parts.append(f'<line x1="{left}" x2="{width}" y1="{y}" y2="{y}" stroke="#ccc"/>'
                     f'<text x="{left - 6}" y="{y + 4}" text-anchor="end" font-size="11">{tick:g}</text>')
    for index, row in enumerate(aggregate):
        x = left + gap + index * group
        for offset, metric in enumerate(METRICS):
            value = row[metric]
            parts.append(f'<rect x="{x + offset * bar}" y="{top + height * (1 - value):.1f}" width="{bar - 2}" '
                         f'height="{height * value:.1f}" fill="{COLORS[metric]}">'
                         f'<title>{html.escape(TITLES[metric])}: {value:.3f}</title></rect>')
        label = html.escape(f"{row['model']} / {row['adapter']}" if many else row["adapter"])
        parts.append(f'<text x="{x}" y="{top + height + 16}" font-size="11" '
                     f'transform="rotate(20 {x} {top + height + 16})">{label}</text>')
    for offset, metric in enumerate(METRICS):
        parts.append(f'<rect x="{left + offset * 110}" y="6" width="10" height="10" fill="{COLORS[metric]}"/>'
                     f'<text x="{left + offset * 110 + 14}" y="15" font-size="11">{TITLES[metric]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def as_html(document: dict, source: str) -> str:
    """A self-contained page (no external assets): the chart, the means, every example."""
    def cells(values: list[str], tag: str = "td") -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(v)}</{tag}>" for v in values) + "</tr>"

    means = [cells(["model", "adapter", "examples", "failed"] + [TITLES[m] for m in METRICS], "th")]
    means += [cells([a["model"], a["adapter"], str(a["examples"]), str(a["failed"])] + [f"{a[m]:.3f}" for m in METRICS])
              for a in document["aggregate"]]
    references = {e["line"]: e["reference"] for e in document["examples"]}
    rows = [cells(["line", "model", "adapter"] + [TITLES[m] for m in METRICS] + ["output", "reference"], "th")]
    rows += [cells([str(r["line"]), r["model"], r["adapter"]] + [f"{r[m]:.2f}" for m in METRICS]
                   + [r["output"] if r["error"] is None else f"failed: {r['error']}", references[r["line"]]])
             for r in document["results"]]
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>lora-run eval</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ddd;padding:2px 8px;text-align:left;white-space:pre-wrap}</style></head><body>"
            f"<h1>lora-run eval: {html.escape(source)}</h1>{_chart(document['aggregate'], len(document['models']) > 1)}"
            f"<h2>Mean scores</h2><table>{''.join(means)}</table>"
            f"<h2>Per example</h2><table>{''.join(rows)}</table></body></html>\n")
