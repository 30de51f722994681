"""``segue eval``: is the new model better on your data? A verdict with statistics, for the cutover gate."""

from __future__ import annotations

import time
from pathlib import Path

import click

from segue.cli.common import (
    console,
    database,
    duration,
)
from segue.control import migration, registry
from segue.settings import Settings
from segue.storage import connections


@click.command("eval")
@click.option("--models", help="OLD,NEW to compare (default: the active migration's two models)")
@click.option("--beir", type=click.Path(exists=True, file_okay=False), help="a BEIR folder: queries.jsonl, qrels/")
@click.option("--split", default="test", show_default=True, help="the BEIR qrels split")
@click.option("--trec-topics", type=click.Path(exists=True, dir_okay=False), help="TREC topics (with --trec-qrels)")
@click.option("--trec-qrels", type=click.Path(exists=True, dir_okay=False), help="TREC qrels (with --trec-topics)")
@click.option("--scifact", is_flag=True, help="the bundled SciFact test set (documents stored as scifact-<id>)")
@click.option("--doc-id-prefix", default="", help="put before the judged document ids to make Segue doc_ids")
@click.option("--slice-by", help="a query metadata field to report results by (Holm-corrected)")
@click.option("--allow-partial", is_flag=True, help="evaluate even though a column is not fully current")
@click.option("--bridged", is_flag=True, help="judge what bridged readers get at the new model's current coverage "
                                              "(through the migration's adapter: segue adapter fit)")
@click.option("--margin", type=float, help="non-inferiority margin on nDCG@10 [default: SEGUE_EVAL_MARGIN]")
@click.option("--required-gain", type=float, help="nDCG@10 gain a pass needs [default: SEGUE_EVAL_REQUIRED_GAIN]")
@click.option("--shadow", is_flag=True, help="also replay logged reader queries on both models (evidence)")
@click.option("--shadow-queries", default=1000, show_default=True, help="how many logged queries to replay")
@click.option("--report", type=click.Path(dir_okay=False), help="write a self-contained HTML report here")
@click.option("--every", help="run again every interval (e.g. 1h) until interrupted: a time series in SQL")
@click.pass_obj
def eval_command(settings: Settings, models: str | None, beir: str | None, split: str, trec_topics: str | None,
                 trec_qrels: str | None, scifact: bool, doc_id_prefix: str, slice_by: str | None, allow_partial: bool,
                 bridged: bool, margin: float | None, required_gain: float | None, shadow: bool, shadow_queries: int,
                 report: str | None, every: str | None) -> None:
    """Is the new model better on your data? A verdict with statistics, stored for the cutover gate.

    Embeds a labelled set's queries with both models, searches the database as readers do
    (exactly, and through the HNSW index when there is one, to report its recall), scores
    nDCG@10, Recall@100, MRR@10 and P@10 per query, and compares them with a paired bootstrap
    interval and randomization test against a non-inferiority margin (or a required gain).
    With --bridged the new side is what bridged readers get now: a pass may open the cutover
    gate before the new model covers every document.
    """
    from segue.devtools.corpus import bundled_scifact
    from segue.embedding.engine import EmbeddingEngine
    from segue.quality import evaluation
    from segue.quality import report as evalreport
    from segue.quality import shadow as shadows
    from segue.quality.evalsets import LabelledSetError, read_beir, read_trec

    sources = [beir is not None, trec_topics is not None or trec_qrels is not None, scifact]
    if sum(sources) > 1 or (sources[1] and not (trec_topics and trec_qrels)):
        raise click.UsageError("give one labelled set: --beir DIR, --trec-topics with --trec-qrels, or --scifact")
    if not any(sources) and not shadow:
        raise click.UsageError("give a labelled set (--beir, --trec-topics/--trec-qrels, --scifact) or --shadow")
    try:
        labelled = (read_beir(Path(beir), split=split, doc_id_prefix=doc_id_prefix) if beir
                    else read_trec(Path(trec_topics), Path(trec_qrels), doc_id_prefix=doc_id_prefix) if trec_topics
                    else bundled_scifact() if scifact else None)
    except LabelledSetError as error:
        raise click.ClickException(str(error)) from None
    options = evaluation.Options(
        margin=settings.eval_margin if margin is None else margin,
        required_gain=settings.eval_required_gain if required_gain is None else required_gain,
        allow_partial=allow_partial, slice_by=slice_by, bridged=bridged)

    def run_once(conn, engine) -> None:
        if models:
            old_name, _, new_name = models.partition(",")
            old, new = registry.get_model(conn, old_name).spec, registry.get_model(conn, new_name).spec
        else:
            active = migration.require_active(conn)
            old, new = registry.get_model(conn, active.from_name).spec, registry.get_model(conn, active.to_name).spec
        evaluation.require_embedded(old, new)
        result = shadow_result = None
        if labelled is not None:
            result = evaluation.evaluate(conn, engine, old, new, labelled, options)
            stored = evaluation.store(conn, result)
            console.print(f"[bold]{result.verdict}[/]: {result.why} (model_evaluations id {stored})")
            for name, c in result.comparisons.items():
                console.print(f"  {name:<10} {old.name} {c.old_mean:.4f}  {new.name} {c.new_mean:.4f}  "
                              f"Δ {c.mean_difference:+.4f} CI [{c.ci_low:+.4f}, {c.ci_high:+.4f}] p {c.p_value:.4f}")
            for side, run in (("old", result.old), ("new", result.new)):
                if run.index_recall_at_10 is not None:
                    console.print(f"  HNSW recall@10 against exact search, {run.spec.name}: {run.index_recall_at_10:.3f}")
            for name, part in result.slices.items():
                console.print(f"  slice {name}: {part['queries']} queries, Δ {part['mean_difference']:+.4f} "
                              f"CI [{part['ci_low']:+.4f}, {part['ci_high']:+.4f}], "
                              f"p of Δ < {options.threshold:+.4f} (one-sided, Holm) {part['p_holm']:.4f}, "
                              f"{part['verdict']}", markup=False)
        if shadow:
            shadow_result = shadows.compare(conn, engine, old, new, limit=shadow_queries)
            active = migration.active_migration(conn)
            shadows.store(conn, shadow_result, old, new, active.id if active else None)
            if shadow_result["queries"]:
                console.print(f"shadow: {shadow_result['queries']} logged queries, overlap@10 "
                              f"{shadow_result['overlap_at_10']:.3f}, rank-biased overlap {shadow_result['rbo']:.3f}")
            console.print(f"shadow: {shadow_result['without_text']} logged queries kept no text and were not replayed")
        if report and result is not None:
            console.print(f"report written to {evalreport.write(Path(report), result, shadow_result)}")

    def run() -> None:
        engine = EmbeddingEngine.from_settings(settings)
        try:
            with connections.connect(settings, database(settings)) as conn:
                run_once(conn, engine)
        finally:
            engine.close()

    try:
        run()
        while every:
            time.sleep(duration(every))
            run()
    except evaluation.EvaluationError as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        pass
