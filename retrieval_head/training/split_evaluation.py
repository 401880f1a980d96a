"""Head vs teacher on a split of each evaluation dataset: the same teacher-built index, two query sides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from retrieval_head.evaluation import RetrievalEvaluator, retention
from retrieval_head.retrieval.index import DocumentIndex
from retrieval_head.training.datasets import ExampleSet, Source, TrainingData

Project = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]  # features, mask, span ids
REPORTED = ("ndcg@10", "recall@10", "mrr@10", "recall@100")


@dataclass
class _Part:
    source: Source
    evaluator: RetrievalEvaluator
    examples: ExampleSet
    positions: list[int]  # row in `examples` of each evaluator query


class SplitEvaluator:
    """Retrieval metrics of the head and of the teacher on `split` ("dev" or "test") of each eval dataset.

    The teacher's metrics (its own query embeddings against its own document index) are computed once;
    `evaluate(project)` embeds the split's queries with the head (from cached features) and compares.
    """

    def __init__(self, data: TrainingData, split: str, key: str, token_level: bool = False) -> None:
        self.split = split
        self.parts: list[_Part] = []
        for source in data.eval_sources():
            rows = source.splits.get(split) or []
            if not rows:
                continue
            ids = [source.query_ids[r] for r in rows]
            view = source.dataset.subset(ids, name=f"{source.name}-{split}")
            if not view.relevant_docs():
                continue
            start, end = source.doc_range
            index = DocumentIndex.from_embeddings(data.documents[start:end], source.dataset.doc_ids,
                                                  data.fingerprint)
            evaluator = RetrievalEvaluator(view, index, name=source.name)
            position = {qid: i for i, qid in enumerate(ids)}
            examples = ExampleSet.from_source(source, rows, key, token_level)
            self.parts.append(_Part(source, evaluator, examples, [position[q] for q in evaluator.query_ids]))
        self.teacher = {p.source.name: p.evaluator.evaluate(p.examples.teacher[p.positions].numpy())
                        for p in self.parts}

    @torch.no_grad()
    def embed(self, project: Project, examples: ExampleSet, batch_size: int = 256) -> torch.Tensor:
        out = []
        for start in range(0, len(examples), batch_size):
            rows = range(start, min(start + batch_size, len(examples)))
            features, mask = examples.head_input(rows)
            out.append(project(features, mask, examples.span_ids(rows)).float().cpu())
        return torch.cat(out) if out else torch.empty((0, examples.teacher.shape[1]))

    def evaluate(self, project: Project) -> dict[str, Any]:
        """{dataset: {"head", "teacher", "retention", "cosine", "queries", "split"}, "mean_retention": {...}}."""
        report: dict[str, Any] = {}
        for p in self.parts:
            emb = self.embed(project, p.examples)
            head = p.evaluator.evaluate(emb[p.positions].numpy())
            teacher = self.teacher[p.source.name]
            cosine = torch.nn.functional.cosine_similarity(emb, p.examples.teacher.float(), dim=-1).mean()
            report[p.source.name] = {
                "split": self.split, "queries": len(p.positions),
                "head": {m: head[m] for m in REPORTED if m in head},
                "teacher": {m: teacher[m] for m in REPORTED if m in teacher},
                "retention": {m: v for m, v in retention(head, teacher).items() if m in REPORTED},
                "cosine": float(cosine),
            }
        datasets = [v for v in report.values() if isinstance(v, dict)]
        if datasets:
            report["mean_retention"] = {
                m: sum(d["retention"].get(m, 0.0) for d in datasets) / len(datasets) for m in REPORTED
            }
            report["mean_retention"]["cosine"] = sum(d["cosine"] for d in datasets) / len(datasets)
        return report


def score(report: dict[str, Any], metric: str) -> float | None:
    """The number that picks the best checkpoint: mean retention of `metric` (or mean cosine)."""
    mean = report.get("mean_retention")
    return None if not mean else float(mean.get(metric, mean.get("cosine", 0.0)))


def format_report(report: dict[str, Any], title: str = "") -> str:
    """A plain-text table: dataset, metric, head, teacher, retained."""
    lines = [title] if title else []
    lines.append(f"{'dataset':<32} {'metric':<11} {'head':>7} {'teacher':>8} {'retained':>9}")
    for name, entry in report.items():
        if not isinstance(entry, dict) or "head" not in entry:
            continue
        for metric in ("ndcg@10", "recall@10", "mrr@10"):
            if metric in entry["head"]:
                kept = entry["retention"].get(metric)
                lines.append(f"{name + ' (' + str(entry['queries']) + ' q)':<32} {metric:<11} "
                             f"{entry['head'][metric]:>7.3f} {entry['teacher'][metric]:>8.3f} "
                             f"{'-' if kept is None else f'{100 * kept:.1f}%':>9}")
        lines.append(f"{name:<32} {'cos(teacher)':<11} {entry['cosine']:>7.3f}")
    return "\n".join(lines)
