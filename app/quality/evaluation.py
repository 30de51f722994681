"""Quality verdicts: a labelled set's queries searched with each model the way readers search, scored with
ir-measures (trec_eval), compared with paired statistics, and stored in ``model_evaluations`` for the cutover
gate and an auditor.

Only queries with a judged document in the corpus count (others cannot tell the models
apart); the count left out is reported. Evaluating a model whose column is not fully
current is refused unless ``allow_partial``, which the verdict records.

``bridged`` judges what bridged readers get at the new model's current coverage instead of
the new model alone: its current vectors ranked in its space, the other documents through
the migration's adapter on the old column, merged on the calibrated scale
(:mod:`segue.client.reader`'s ``bridged`` mode, searched exactly). A bridged pass may open
the cutover gate below its coverage threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime

import ir_measures
import numpy as np
import psycopg
from ir_measures import RR, P, R, nDCG

from segue.client.search import nearest, nearest_bridged
from segue.control import bridging, migration
from segue.embedding import providers
from segue.embedding.engine import EmbeddingEngine
from segue.quality.evalsets import LabelledSet
from segue.quality.verdict import Comparison, compare, decide, slices_below
from segue.spec import ModelSpec
from segue.storage import adapters, documents, migrations, model_columns

PRIMARY = nDCG @ 10
MEASURES = [nDCG @ 10, R @ 100, RR @ 10, P @ 10]
NAMES = {nDCG @ 10: "ndcg@10", R @ 100: "recall@100", RR @ 10: "mrr@10", P @ 10: "p@10"}
DEPTH = 100  # documents retrieved per query (Recall@100)


class EvaluationError(RuntimeError):
    """An evaluation that cannot be run as asked (coverage, no judged query in the corpus)."""


@dataclass(frozen=True)
class Options:
    """How a verdict is reached: the threshold, the statistics, the coverage rule, the slices."""

    margin: float = -0.01  # non-inferiority: new − old must stay above this
    required_gain: float | None = None  # when set, new − old must be above this instead
    confidence: float = 0.95
    resamples: int = 10_000
    seed: int = 0
    allow_partial: bool = False
    slice_by: str | None = None
    bridged: bool = False

    @property
    def threshold(self) -> float:
        return self.margin if self.required_gain is None else self.required_gain


@dataclass(frozen=True)
class ModelRun:
    """One model's side: per-query scores for each measure, top-1 similarities, index recall, coverage."""

    spec: ModelSpec
    scores: dict[str, dict[str, float]]  # measure name → query id → value
    top1: dict[str, float]
    index_recall_at_10: float | None  # mean overlap of the index's top 10 with the exact top 10; None: no index
    coverage_pct: float
    unembedded: list[str]  # queries the model gave no usable vector: they retrieve nothing (every score 0)
    adapter: adapters.StoredAdapter | None = None  # the new side searched as bridged readers do, through it


@dataclass(frozen=True)
class Evaluation:
    """A labelled verdict and every figure behind it."""

    dataset: str
    dataset_fingerprint: str
    queries: list[str]
    queries_left_out: int
    old: ModelRun
    new: ModelRun
    comparisons: dict[str, Comparison]  # measure name → new vs old
    slices: dict[str, dict] = field(default_factory=dict)
    verdict: str = "inconclusive"
    why: str = ""
    options: Options = Options()
    evaluated_at: datetime | None = None

    def detail(self) -> dict:
        """What ``model_evaluations.detail`` keeps: settings, figures, per-query scores, slices."""
        return {
            "kind": "labelled", "dataset": self.dataset, "dataset_fingerprint": self.dataset_fingerprint,
            "queries": len(self.queries), "queries_left_out": self.queries_left_out, "why": self.why,
            "options": asdict(self.options), "threshold": self.options.threshold,
            "old_model": self.old.spec.name, "new_model": self.new.spec.name,
            "coverage": {"old": self.old.coverage_pct, "new": self.new.coverage_pct},
            "allow_partial": self.options.allow_partial,
            "comparisons": {name: c.as_dict() for name, c in self.comparisons.items()},
            "index_recall_at_10": {"old": self.old.index_recall_at_10, "new": self.new.index_recall_at_10},
            "per_query": {"ids": self.queries,
                          "old": [self.old.scores["ndcg@10"][q] for q in self.queries],
                          "new": [self.new.scores["ndcg@10"][q] for q in self.queries]},
            "top1": {"old": [self.old.top1.get(q) for q in self.queries],
                     "new": [self.new.top1.get(q) for q in self.queries]},
            "slices": self.slices,
            "bridged": None if self.new.adapter is None else {
                "adapter_id": self.new.adapter.id, "kind": self.new.adapter.space_map.kind,
                "pairs": self.new.adapter.pairs, "retention": self.new.adapter.retention},
        }


def require_embedded(*specs: ModelSpec) -> None:
    """Refuse (EvaluationError, saying what to do) a model Segue cannot embed queries with: adopted vectors."""
    for spec in specs:
        if not providers.embeds(spec):
            raise EvaluationError(
                f"model {spec.name!r} holds adopted vectors, and Segue cannot embed the queries to search them with: "
                f"bind it to the model that made them (segue models bind {spec.name} --source MODEL; an API model: "
                f"--provider openai --source BASE_URL --option model=NAME), then run segue eval again")


def evaluate(conn: psycopg.Connection, engine: EmbeddingEngine, old: ModelSpec, new: ModelSpec,
             labelled: LabelledSet, options: Options) -> Evaluation:
    """Search ``labelled``'s queries with both models, score them and reach a verdict (not stored)."""
    require_embedded(old, new)  # the old model's own ranking is the baseline, bridged or not
    adapter = bridging.usable(conn, new, old) if options.bridged else None
    coverage = {spec.name: migration.coverage_pct(conn, spec.version) for spec in (old, new)}
    bridged_side = new.name if options.bridged else None  # bridged reads are judged at whatever coverage it has
    partial = {name: pct for name, pct in coverage.items() if pct < 100.0 and name != bridged_side}
    if partial and not options.allow_partial:
        raise EvaluationError(
            "evaluating a column that is not fully current is refused: " + ", ".join(
                f"{name} covers {pct:.2f}%" for name, pct in partial.items()) + " (--allow-partial to do it anyway)")
    judged = labelled.judged()
    present = documents.existing(conn, {d for q in judged for d, r in labelled.qrels[q].items() if r > 0})
    queries = [q for q in judged if any(r > 0 and d in present for d, r in labelled.qrels[q].items())]
    if not queries:
        raise EvaluationError(f"no query of {labelled.name} has a judged document in the corpus: its qrels name "
                              "doc_ids Segue does not hold (if your doc_ids carry a prefix, give it: --doc-id-prefix)")
    qrels = [ir_measures.Qrel(q, d, r) for q in queries for d, r in labelled.qrels[q].items()]
    texts = [labelled.queries[q] for q in queries]
    old_vectors = _query_vectors(engine, old, texts)  # bridged readers carry the new query with the old one's
    runs = [_run(conn, old, old_vectors, queries, qrels, coverage[old.name]),
            _run(conn, new, _query_vectors(engine, new, texts), queries, qrels, coverage[new.name],
                 bridge=(old, adapter, old_vectors) if adapter else None)]
    comparisons = {NAMES[m]: _compare(runs[0], runs[1], NAMES[m], queries, options) for m in MEASURES}
    verdict = decide(comparisons["ndcg@10"], options.threshold)
    why = (f"nDCG@10 new − old = {comparisons['ndcg@10'].mean_difference:+.4f}, "
           f"{options.confidence:.0%} CI [{comparisons['ndcg@10'].ci_low:+.4f}, {comparisons['ndcg@10'].ci_high:+.4f}]"
           f" against {'a required gain' if options.required_gain is not None else 'a margin'} of "
           f"{options.threshold:+.4f} over {len(queries)} queries")
    slices, below = _slices(runs, queries, labelled, options) if options.slice_by else ({}, [])
    if below:
        verdict, why = "fail", why + (f"; slice(s) {', '.join(below)} are significantly below "
                                      f"{options.threshold:+.4f} (one-sided, Holm-corrected)")
    for run in runs:
        if run.unembedded:
            why += (f"; {len(run.unembedded)} queries got no usable vector from {run.spec.name} and retrieve nothing "
                    f"(first: {run.unembedded[0]!r})")
    if partial:
        why += "; partial coverage: " + ", ".join(f"{n} {p:.2f}%" for n, p in partial.items())
    if adapter is not None:
        why += (f"; bridged at {coverage[new.name]:.2f}% coverage of {new.name} through adapter {adapter.id} "
                f"({adapter.space_map.kind}, {adapter.pairs} pairs)")
    return Evaluation(labelled.name, labelled.fingerprint, queries, len(judged) - len(queries), runs[0], runs[1],
                      comparisons, slices, verdict, why, options)


def store(conn: psycopg.Connection, evaluation: Evaluation) -> int:
    """Record the verdict, for the active migration when it compares that migration's two models; its id."""
    active = migration.active_migration(conn)
    ours = active is not None and (active.from_version, active.to_version) == (
        evaluation.old.spec.version, evaluation.new.spec.version)
    primary = evaluation.comparisons["ndcg@10"]
    return migrations.record_labelled(
        conn, migration_id=active.id if ours else None, old_version=evaluation.old.spec.version,
        new_version=evaluation.new.spec.version, metric="ndcg@10", old_value=primary.old_mean,
        new_value=primary.new_mean, verdict=evaluation.verdict, detail=evaluation.detail())


def latest_line(conn: psycopg.Connection, active: migration.Migration) -> str:
    """The active migration's latest labelled verdict, in one line."""
    row = migrations.latest_verdict_summary(conn, active.id)
    if row is None:
        return "no verdict yet (segue eval)"
    verdict, at, why = row
    return f"{verdict} ({at:%Y-%m-%d %H:%M}): {why}"


def _query_vectors(engine: EmbeddingEngine, spec: ModelSpec, texts: list[str]) -> list:
    """``texts`` embedded by ``spec``, None where the model gave no usable vector."""
    embedded = engine.embed_counted_sync(spec, texts)
    return [None if i in embedded.rejected else v for i, v in enumerate(embedded.vectors)]


def _run(conn: psycopg.Connection, spec: ModelSpec, vectors: list, queries: list[str], qrels: list,
         coverage_pct: float, bridge: tuple[ModelSpec, adapters.StoredAdapter, list] | None = None) -> ModelRun:
    """``spec``'s side: its queries' ``vectors`` searched exactly (with ``bridge``, the (old model, adapter, old
    model's query vectors) that bridged readers search the documents ``spec`` lacks with), scored; and its HNSW
    index's recall."""
    unembedded = [q for q, v in zip(queries, vectors) if v is None]
    old_vectors = bridge[2] if bridge is not None else [None] * len(queries)

    def search(vector, old_vector) -> list:
        if bridge is None:
            return nearest(conn, spec, vector, DEPTH, exact=True)
        old, adapter, _ = bridge
        return nearest_bridged(conn, spec, old, adapter.space_map, vector, DEPTH, old_query=old_vector, exact=True)

    exact = {q: [] if v is None else search(v, o) for q, v, o in zip(queries, vectors, old_vectors)}
    run = [ir_measures.ScoredDoc(q, hit.doc_id, hit.score) for q, hits in exact.items() for hit in hits]
    scores: dict[str, dict[str, float]] = {NAMES[m]: dict.fromkeys(queries, 0.0) for m in MEASURES}
    for metric in ir_measures.iter_calc(MEASURES, qrels, run):
        scores[NAMES[metric.measure]][metric.query_id] = float(metric.value)
    recall = None
    if bridge is None and model_columns.index_valid(conn, spec.version):  # bridged lists are not one index's
        overlaps = [len({h.doc_id for h in nearest(conn, spec, v, 10)} & {h.doc_id for h in exact[q][:10]})
                    / max(min(10, len(exact[q])), 1) for q, v in zip(queries, vectors) if q not in unembedded]
        recall = float(np.mean(overlaps)) if overlaps else None
    top1 = {q: hits[0].score for q, hits in exact.items() if hits}
    return ModelRun(spec, scores, top1, recall, coverage_pct, unembedded, bridge[1] if bridge else None)


def _compare(old: ModelRun, new: ModelRun, measure: str, queries: list[str], options: Options) -> Comparison:
    return compare(np.array([old.scores[measure][q] for q in queries]),
                   np.array([new.scores[measure][q] for q in queries]),
                   confidence=options.confidence, resamples=options.resamples, seed=options.seed)


def _differences(runs: list[ModelRun], measure: str, queries: list[str]) -> np.ndarray:
    """new − old on ``measure``, per query."""
    return np.array([runs[1].scores[measure][q] - runs[0].scores[measure][q] for q in queries])


def _slices(runs: list[ModelRun], queries: list[str], labelled: LabelledSet,
            options: Options) -> tuple[dict[str, dict], list[str]]:
    """Each slice's comparison and its test against the threshold; and the slices significantly below it."""
    groups: dict[str, list[str]] = {}
    for q in queries:
        value = labelled.query_metadata.get(q, {}).get(options.slice_by)
        groups.setdefault("(none)" if value is None else str(value), []).append(q)
    compared = {name: _compare(runs[0], runs[1], "ndcg@10", members, options) for name, members in groups.items()}
    tested = slices_below({name: _differences(runs, "ndcg@10", members) for name, members in groups.items()},
                          options.threshold, resamples=options.resamples, seed=options.seed)
    slices = {name: {**c.as_dict(), "p_below_threshold": tested[name].p_below, "p_holm": tested[name].p_holm,
                     "verdict": decide(c, options.threshold)} for name, c in compared.items()}
    return slices, [name for name, test in tested.items() if test.below]
