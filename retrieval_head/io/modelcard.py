"""Model cards for heads: Hub metadata as sentence-transformers writes it, plus what the head is and how it does.

The template ships inside the package (`retrieval_head/model_cards/template.md`). The generated body sits
between `<!-- retrieval-head:begin ... -->` and `<!-- retrieval-head:end -->`; `merge_card` replaces only that
section of an existing README (a user's text around it and their metadata keys are kept).

`config.metrics` is read in either of two shapes (numbers are fractions, e.g. 0.607)::

    {"<dataset>": {"head": {"recall@10": ..., "mrr@10": ...}, "teacher": {...}, "split": "test"}, ...,
     "speed": {"head_ms_per_query": 2.0, "teacher_ms_per_query": 43.5, "device": "cuda"}}
    {"dataset": "<dataset>", "head": {...}, "teacher": {...}, "speed": {...}}
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard import REGEX_YAML_BLOCK

from retrieval_head.core.config import RetrievalHeadConfig

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
BEGIN = "<!-- retrieval-head:begin"
END = "<!-- retrieval-head:end -->"
LIBRARY_NAME = "sentence-transformers"
TAGS = ["retrieval-head", "sentence-transformers", "feature-extraction", "sentence-similarity", "retrieval"]
PIPELINE_TAG = "sentence-similarity"
OWNED_KEYS = ("library_name", "pipeline_tag", "base_model", "base_model_relation", "model-index")
"""Metadata keys a render owns; tags and datasets are merged with the user's instead."""
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_LOSSES = {
    "cosine": "cosine alignment to the teacher's embedding of the same query",
    "infonce": "InfoNCE contrastive loss: the teacher's embedding of the same query is the positive, its "
    "embeddings of the other queries in the batch are the negatives (label-free)",
    "infonce_gold": "InfoNCE contrastive loss against the teacher's embeddings of the gold documents (the qrels), "
    "in-batch negatives",
    "rank_kl": "rank distillation: KL divergence between the teacher's and the head's score distributions "
    "over the teacher's top-k documents",
    "mse": "mean squared error to the teacher's embedding",
}
_LOSS_ALIASES = {"cos": "cosine", "alignment": "cosine", "contrastive": "infonce", "info_nce": "infonce",
                 "rank": "rank_kl", "kl": "rank_kl", "rank_distillation": "rank_kl", "distill": "rank_kl"}


def template_text() -> str:
    """The card template shipped in the package."""
    return resources.files("retrieval_head").joinpath("model_cards", "template.md").read_text(encoding="utf-8")


def is_hub_id(name: str | None) -> bool:
    """Whether `name` looks like a Hub repo id (and is not a local folder)."""
    return bool(name) and _REPO_ID.fullmatch(name) is not None and not Path(name).exists()


@dataclass(frozen=True)
class ResultRow:
    dataset: str
    metric: str
    head: str
    teacher: str
    retained: str
    head_value: float | None
    retained_value: float | None
    split: str | None


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:.1f}"
    if isinstance(value, (dict, list, tuple)):
        return "`" + json.dumps(value, sort_keys=True) + "`"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def split_metrics(metrics: dict[str, Any] | None) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """`config.metrics` as (dataset -> {"head", "teacher", "split"}, speed dict), whichever shape it has."""
    if not metrics:
        return {}, {}
    speed = dict(metrics.get("speed") or {})
    if isinstance(metrics.get("head"), dict):
        return {str(metrics.get("dataset") or "eval"): metrics}, speed
    datasets = {name: value for name, value in metrics.items()
                if isinstance(value, dict) and isinstance(value.get("head"), dict)}
    return datasets, speed


def result_rows(metrics: dict[str, Any] | None) -> list[ResultRow]:
    """One row per dataset and metric: head, teacher and the head's share of the teacher's score."""
    rows = []
    for dataset, entry in split_metrics(metrics)[0].items():
        teacher = entry.get("teacher") or {}
        for metric, value in entry["head"].items():
            head_value, teacher_value = _number(value), _number(teacher.get(metric))
            retained = head_value / teacher_value if head_value is not None and teacher_value else None
            rows.append(ResultRow(
                dataset=dataset, metric=metric, head=_fmt(head_value if head_value is not None else value),
                teacher=_fmt(teacher_value), retained="—" if retained is None else f"{100 * retained:.1f}%",
                head_value=head_value, retained_value=retained, split=entry.get("split"),
            ))
    return rows


def eval_results(metrics: dict[str, Any] | None) -> list[EvalResult]:
    """model-index entries: the head's measured metrics and, where the teacher was measured, the retention."""
    results = []
    for row in result_rows(metrics):
        common = dict(task_type="information-retrieval", task_name="Information Retrieval",
                      dataset_type=row.dataset, dataset_name=row.dataset, dataset_split=row.split)
        if row.head_value is not None:
            results.append(EvalResult(metric_type=f"cosine_{row.metric}", metric_name=f"Cosine {row.metric}",
                                      metric_value=round(row.head_value, 4), **common))
        if row.retained_value is not None:
            results.append(EvalResult(metric_type=f"retention_{row.metric}",
                                      metric_name=f"{row.metric} retained vs teacher",
                                      metric_value=round(row.retained_value, 4), **common))
    return results


def losses_text(training: dict[str, Any] | None) -> str:
    """The losses of the recipe in words (with their weights when given)."""
    losses = (training or {}).get("losses", (training or {}).get("loss"))
    if not losses:
        return "not recorded."
    items = losses.items() if isinstance(losses, dict) else [(name, None) for name in
                                                              ([losses] if isinstance(losses, str) else losses)]
    parts = []
    for name, weight in items:
        key = _LOSS_ALIASES.get(str(name).lower(), str(name).lower())
        if key == "infonce" and (training or {}).get("gold_positives"):
            key = "infonce_gold"
        text = _LOSSES.get(key, str(name))
        parts.append(f"{text}" + (f" (weight {_fmt(weight)})" if weight is not None else ""))
    return "; ".join(parts) + "."


def card_data(config: RetrievalHeadConfig, repo_id: str | None = None, model_name: str | None = None) -> ModelCardData:
    """The card's YAML metadata, in the keys the Hub and sentence-transformers use."""
    training = config.training or {}
    datasets = [d for d in training.get("datasets") or [] if isinstance(d, str) and is_hub_id(d)]
    base = config.base_model_name_or_path
    results = eval_results(config.metrics)
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        tags=list(TAGS),
        base_model=base if is_hub_id(base) else None,
        datasets=datasets or None,
        model_name=model_name or _model_name(config, repo_id),
        eval_results=results or None,
    )
    if data.base_model:
        data.base_model_relation = "adapter"
    return data


def _model_name(config: RetrievalHeadConfig, repo_id: str | None) -> str:
    if repo_id:
        return repo_id.split("/")[-1]
    base = Path(config.base_model_name_or_path or "causal LM").name
    teacher = Path((config.teacher or {}).get("teacher_id") or "a teacher").name
    return f"Retrieval head for {base} matching {teacher}"


def render_card(
    config: RetrievalHeadConfig,
    repo_id: str | None = None,
    num_head_parameters: int | None = None,
    model_name: str | None = None,
) -> str:
    """The full README.md (YAML metadata + body) for a head."""
    teacher = config.teacher or {}
    base = config.base_model_name_or_path or "the base model"
    _, speed = split_metrics(config.metrics)
    teacher_id = teacher.get("teacher_id") or "the teacher"
    card = ModelCard.from_template(
        card_data(config, repo_id, model_name),
        template_str=template_text(),
        model_name=model_name or _model_name(config, repo_id),
        repo_id=repo_id or "path/to/head",
        base_model_display=f"`{base}`" if not is_hub_id(base) else base,
        base_model_url=f"https://huggingface.co/{base}" if is_hub_id(base) else "#model-details",
        base_revision=config.revision,
        base_architecture=config.base_architecture,
        base_num_layers=config.base_num_layers,
        base_hidden_size=config.base_hidden_size,
        adapter=(config.adapter_name_or_path or "") + (f" @ `{config.adapter_revision}`"
                                                       if config.adapter_revision else ""),
        head_type=config.head_type,
        num_head_parameters=f"{num_head_parameters:,}" if num_head_parameters else "a few million",
        layer=config.layer,
        pooling=config.pooling,
        inner_dim=config.inner_dim,
        static_dim=config.static_dim,
        static_span=config.static_span,
        query_template=config.query_template,
        max_length=config.max_length,
        quantize_to=config.quantize_to or "None (fp32)",
        output_dim=config.output_dim,
        normalize=config.normalize,
        similarity_fn_name=teacher.get("similarity_fn_name") or "cosine",
        library_version=config.library_version,
        teacher_id=teacher_id,
        teacher_display=f"[{teacher_id}](https://huggingface.co/{teacher_id})" if is_hub_id(teacher_id)
        else f"`{teacher_id}`",
        teacher_rows=[(key, _fmt(value)) for key, value in teacher.items()],
        training_rows=[(key, _fmt(value)) for key, value in (config.training or {}).items()],
        losses_text=losses_text(config.training),
        results_rows=result_rows(config.metrics),
        speed_rows=[(key, _fmt(value)) for key, value in speed.items()],
        example_query="is breakfast included in the price of the room?",
        example_history="I'm looking for a hotel in the city centre.",
    )
    return str(card).rstrip() + "\n"


def _section(text: str) -> tuple[int, int] | None:
    start = text.find(BEGIN)
    end = text.find(END, start + 1) if start >= 0 else -1
    return (start, end + len(END)) if end >= 0 else None


def split_front_matter(card: str) -> tuple[dict[str, Any], str]:
    """A card's YAML metadata (in file order; {} if absent or unreadable) and its body."""
    match = REGEX_YAML_BLOCK.search(card)
    if not match:
        return {}, card
    try:
        data = yaml.safe_load(match.group(2)) or {}
    except yaml.YAMLError as err:
        logger.warning("The existing model card's YAML metadata is not valid (%s); it is replaced.", err)
        data = {}
    return (data if isinstance(data, dict) else {}), card[match.end():]


def merge_card(existing: str | None, generated: str) -> str:
    """`generated` merged into an existing README: our section and metadata keys replaced, the rest kept."""
    if not existing or not existing.strip():
        return generated
    data, old_text = split_front_matter(existing)
    ours, new_text = split_front_matter(generated)
    tags = list(dict.fromkeys([*(data.get("tags") or []), *(ours.get("tags") or [])]))
    datasets = list(dict.fromkeys([*(data.get("datasets") or []), *(ours.get("datasets") or [])]))
    ours = {key: value for key, value in ours.items() if value is not None}
    ours["tags"] = tags
    if datasets:
        ours["datasets"] = datasets
    # Keys keep their place; owned keys our render no longer has (e.g. stale metrics) are dropped.
    data = {key: ours.get(key, value) for key, value in data.items() if key not in OWNED_KEYS or key in ours}
    data.update({key: value for key, value in ours.items() if key not in data})
    span = _section(new_text)
    section = new_text[span[0]:span[1]] if span else new_text.strip()
    body = old_text
    old_span = _section(body)
    body = body[: old_span[0]] + section + body[old_span[1]:] if old_span else f"{body.rstrip()}\n\n{section}\n"
    metadata = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return f"---\n{metadata}---\n\n{body.strip()}\n"


def write_card(
    folder: str | Path,
    config: RetrievalHeadConfig,
    existing: str | None = None,
    repo_id: str | None = None,
    num_head_parameters: int | None = None,
) -> Path:
    """Render the card into `folder/README.md`, merged into `existing` (a README already there) if given."""
    path = Path(folder) / CARD_NAME
    generated = render_card(config, repo_id=repo_id, num_head_parameters=num_head_parameters)
    path.write_text(merge_card(existing, generated), encoding="utf-8")
    return path
