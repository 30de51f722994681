"""``segue eval --report``: one self-contained HTML file, the verdict at the top, plots embedded as images.

Plots (matplotlib, drawn off-screen): the per-query nDCG@10 differences, the confidence
interval against the threshold, per-slice differences when slicing, and the top-1
similarity of both models (labelled queries, and shadow queries when compared).
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from pathlib import Path

from segue.quality.evaluation import Evaluation

COLOURS = {"pass": "#1a7f37", "fail": "#cf222e", "inconclusive": "#9a6700"}


def write(path: Path, evaluation: Evaluation, shadow: dict | None = None) -> Path:
    """Write the report of ``evaluation`` (and of a ``shadow`` comparison) to ``path``."""
    try:
        import matplotlib
    except ImportError:
        raise ModuleNotFoundError("the HTML report draws its plots with matplotlib: pip install 'segue[report]'") from None

    matplotlib.use("Agg")
    detail = evaluation.detail()
    primary = evaluation.comparisons["ndcg@10"]
    sections = [
        f'<div class="verdict" style="background:{COLOURS[evaluation.verdict]}">verdict: '
        f"<b>{evaluation.verdict}</b> — {html.escape(evaluation.new.spec.name)} against "
        f"{html.escape(evaluation.old.spec.name)}</div>",
        f"<p>{html.escape(evaluation.why)}.</p>",
        _metrics_table(evaluation),
        _facts(evaluation, detail),
        _figure("Per-query nDCG@10 difference (new − old)", _histogram(
            [n - o for o, n in zip(detail["per_query"]["old"], detail["per_query"]["new"])], "new − old")),
        _figure("Mean difference and its confidence interval", _interval(primary, evaluation.options.threshold)),
        _figure("Top-1 cosine similarity, labelled queries", _distributions(detail["top1"], evaluation)),
    ]
    if evaluation.slices:
        sections.append(_figure(f"By {html.escape(evaluation.options.slice_by)}", _slices(evaluation.slices)))
        sections.append(_slice_table(evaluation.slices))
    if shadow and shadow.get("queries"):
        sections.append(f"<h2>Shadow queries</h2><p>{shadow['queries']} logged queries replayed on both models: "
                        f"overlap@10 {shadow['overlap_at_10']:.3f}, rank-biased overlap {shadow['rbo']:.3f} "
                        f"({shadow['without_text']} logged without text could not be replayed).</p>")
        sections.append(_figure("Top-1 cosine similarity, shadow queries", _distributions(shadow["top1"], evaluation)))
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Segue evaluation: "
            f"{html.escape(evaluation.new.spec.name)} vs {html.escape(evaluation.old.spec.name)}</title>"
            f"<style>{STYLE}</style></head><body><h1>Segue evaluation</h1>{''.join(sections)}"
            f"<footer>written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</footer></body></html>")
    path = Path(path)
    path.write_text(page)
    return path


STYLE = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#1f2328}"
         ".verdict{color:white;font-size:1.6em;padding:.6em 1em;border-radius:8px}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #d0d7de;padding:.3em .6em;text-align:right}"
         "th:first-child,td:first-child{text-align:left}figure{margin:1.5em 0}img{max-width:100%}"
         "footer{color:#656d76;margin-top:2em}")


def _metrics_table(evaluation: Evaluation) -> str:
    rows = "".join(
        f"<tr><td>{name}</td><td>{c.old_mean:.4f}</td><td>{c.new_mean:.4f}</td><td>{c.mean_difference:+.4f}</td>"
        f"<td>[{c.ci_low:+.4f}, {c.ci_high:+.4f}]</td><td>{c.p_value:.4f}</td></tr>"
        for name, c in evaluation.comparisons.items())
    return (f"<table><tr><th>metric</th><th>{html.escape(evaluation.old.spec.name)}</th>"
            f"<th>{html.escape(evaluation.new.spec.name)}</th><th>new − old</th>"
            f"<th>{evaluation.options.confidence:.0%} CI</th><th>p (randomization)</th></tr>{rows}</table>")


def _facts(evaluation: Evaluation, detail: dict) -> str:
    recall = detail["index_recall_at_10"]
    facts = {
        "dataset": f"{evaluation.dataset} ({evaluation.dataset_fingerprint[:16]}…)",
        "queries": f"{len(evaluation.queries)} ({evaluation.queries_left_out} left out: no judged document in the corpus)",
        "threshold": f"{evaluation.options.threshold:+.4f} "
                     f"({'required gain' if evaluation.options.required_gain is not None else 'non-inferiority margin'})",
        "coverage": f"old {evaluation.old.coverage_pct:.2f}%, new {evaluation.new.coverage_pct:.2f}%"
                    + (" (partial allowed)" if evaluation.options.allow_partial else ""),
        "HNSW recall@10 vs exact": ", ".join(f"{side} {value:.3f}" for side, value in recall.items()
                                             if value is not None) or "no index",
    }
    return "<table>" + "".join(f"<tr><td>{k}</td><td>{html.escape(v)}</td></tr>" for k, v in facts.items()) + "</table>"


def _slice_table(slices: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{s['queries']}</td><td>{s['mean_difference']:+.4f}</td>"
                   f"<td>[{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]</td><td>{s['p_holm']:.4f}</td><td>{s['verdict']}</td></tr>"
                   for name, s in slices.items())
    return ("<table><tr><th>slice</th><th>queries</th><th>new − old</th><th>CI</th><th>p below threshold (Holm)</th><th>verdict</th></tr>"
            f"{rows}</table>")


def _figure(title: str, png: bytes) -> str:
    return (f"<figure><figcaption><b>{title}</b></figcaption>"
            f"<img alt='{html.escape(title)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></figure>")


def _png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _histogram(values: list[float], label: str) -> bytes:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 3))
    axes.hist(values, bins=30, color="#0969da")
    axes.axvline(0, color="black", linewidth=1)
    axes.set_xlabel(label)
    axes.set_ylabel("queries")
    return _png(figure)


def _interval(comparison, threshold: float) -> bytes:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 1.6))
    low, high = comparison.ci_low, comparison.ci_high
    axes.errorbar([comparison.mean_difference], [0], xerr=[[comparison.mean_difference - low],
                                                           [high - comparison.mean_difference]],
                  fmt="o", color="#0969da", capsize=6)
    axes.axvline(threshold, color="#cf222e", linestyle="--", label=f"threshold {threshold:+.3f}")
    axes.axvline(0, color="black", linewidth=1)
    axes.set_yticks([])
    axes.set_xlabel("nDCG@10, new − old")
    axes.legend(loc="upper left", fontsize=8)
    return _png(figure)


def _distributions(top1: dict, evaluation: Evaluation) -> bytes:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 3))
    for side, spec in (("old", evaluation.old.spec), ("new", evaluation.new.spec)):
        axes.hist([v for v in top1[side] if v is not None], bins=30, alpha=0.6, label=spec.name)
    axes.set_xlabel("cosine similarity of the best hit")
    axes.set_ylabel("queries")
    axes.legend()
    return _png(figure)


def _slices(slices: dict) -> bytes:
    import matplotlib.pyplot as plt

    names = list(slices)
    figure, axes = plt.subplots(figsize=(8, 0.5 + 0.4 * len(names)))
    means = [slices[n]["mean_difference"] for n in names]
    errors = [[m - slices[n]["ci_low"] for n, m in zip(names, means)], [slices[n]["ci_high"] - m for n, m in zip(names, means)]]
    axes.barh(names, means, xerr=errors, color="#0969da", capsize=4)
    axes.axvline(0, color="black", linewidth=1)
    axes.set_xlabel("nDCG@10, new − old")
    return _png(figure)
