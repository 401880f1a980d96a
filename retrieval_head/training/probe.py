"""Layer x pooling probe: a closed-form linear head per cached feature, scored on the dev split.

For every `(pooling, layer)` the LM pass already produced, fit ridge regression from the standardised pooled
states to the teacher's query embeddings on the train split (exact and instant, no SGD noise), then measure
on the dev split: cosine to the teacher and the retrieval retention (head / teacher nDCG@10, Recall@10, ...)
against the teacher-built index. The table is recorded in the trained head's `config.probe`, so the choice of
`layer` and `pooling` is measured, not guessed.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from retrieval_head.training.datasets import TrainingData
from retrieval_head.training.split_evaluation import SplitEvaluator

logger = logging.getLogger(__name__)


def ridge_fit(features: torch.Tensor, targets: torch.Tensor, ridge: float = 1.0, bias: bool = True) -> torch.Tensor:
    """[H + 1, D] weights (last row = bias; [H, D] with `bias=False`) minimising ||[X 1] W - T||^2 + ridge * ||W||^2,
    in float64."""
    x = features.double()
    if bias:
        x = torch.cat([x, torch.ones(features.shape[0], 1, dtype=torch.float64)], dim=1)
    gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, x.T @ targets.double()).float()


def run_probe(data: TrainingData, ridge: float = 1.0, metric: str = "ndcg@10",
              keys: list[str] | None = None) -> dict[str, Any]:
    """Fit and score every pooled feature; returns the table and the best `(layer, pooling)` by dev `metric`."""
    results = []
    for key in keys or data.feature_keys:
        pooling, _, layer = key.rpartition(".L")
        train = data.examples("train", key)
        weights = ridge_fit(train.features.float(), train.teacher.float(), ridge)

        def project(features: torch.Tensor, mask: torch.Tensor | None, span_ids: torch.Tensor | None = None,
                    w: torch.Tensor = weights) -> torch.Tensor:
            return torch.nn.functional.normalize(features.float() @ w[:-1] + w[-1], dim=-1)

        report = SplitEvaluator(data, "dev", key).evaluate(project)
        mean = report.get("mean_retention", {})
        row = {"layer": int(layer), "pooling": pooling, "cosine": round(mean.get("cosine", float("nan")), 4)}
        row.update({m: round(v, 4) for m, v in mean.items() if m != "cosine"})
        row["per_dataset"] = {name: {"cosine": round(e["cosine"], 4),
                                     **{m: round(v, 4) for m, v in e["retention"].items()}}
                              for name, e in report.items() if isinstance(e, dict) and "retention" in e}
        results.append(row)
        logger.info("probe %s: cosine %.3f, %s retention %.3f", key, row["cosine"], metric, row.get(metric, 0))
    if not results:
        raise ValueError("the probe found no pooled features to fit")
    best = max(results, key=lambda r: (r.get(metric, r["cosine"]), r["cosine"]))
    return {
        "method": "ridge regression on pooled features (train split) -> dev retention vs teacher",
        "ridge": ridge, "metric": f"mean dev retention of {metric}",
        "train_examples": len(data.examples("train", (keys or data.feature_keys)[0])),
        "results": results, "best": {"layer": best["layer"], "pooling": best["pooling"]},
    }


def format_probe(probe: dict[str, Any]) -> str:
    """The probe table as text, best row marked."""
    best = probe["best"]
    header = f"{'layer':>5} {'pooling':<11} {'cosine':>7} {'nDCG@10':>8} {'R@10':>7} {'MRR@10':>7}"
    lines = [header + "  (retention vs teacher)"]
    for r in sorted(probe["results"], key=lambda r: (r["pooling"], r["layer"])):
        mark = "  <- best" if (r["layer"], r["pooling"]) == (best["layer"], best["pooling"]) else ""
        lines.append(f"{r['layer']:>5} {r['pooling']:<11} {r['cosine']:>7.3f} {r.get('ndcg@10', 0):>8.3f} "
                     f"{r.get('recall@10', 0):>7.3f} {r.get('mrr@10', 0):>7.3f}{mark}")
    return "\n".join(lines)



def probe_recipe(recipe: Any, base: Any = None, tokenizer: Any = None, teacher: Any = None) -> dict[str, Any]:
    """Load the recipe's models (unless given), build its data from the caches and run the probe."""
    from retrieval_head.core.model import get_retrieval_model
    from retrieval_head.retrieval.fingerprint import TeacherFingerprint
    from retrieval_head.training.datasets import build_training_data
    from retrieval_head.training.setup import head_config, load_models, recipe_cache

    if base is None or teacher is None:
        base, tokenizer, teacher = load_models(recipe)
    fingerprint = TeacherFingerprint.from_sentence_transformer(teacher, teacher_id=recipe.teacher.model,
                                                               revision=recipe.teacher.revision)
    model = get_retrieval_model(base, head_config(recipe, fingerprint), tokenizer)
    data = build_training_data(recipe, model, teacher, fingerprint, recipe_cache(recipe))
    return run_probe(data, recipe.probe.ridge, recipe.probe.metric)
