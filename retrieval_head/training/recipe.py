"""A training recipe: every setting of a run in one YAML file, validated, comparable (for the resume check).

```yaml
name: smollm2-135m-minilm
base: {model: HuggingFaceTB/SmolLM2-135M-Instruct, revision: null}
teacher: {model: sentence-transformers/all-MiniLM-L6-v2, revision: null}
head: {layer: 20, pooling: mean, head_type: mlp, inner_dim: 1024, dropout: 0.1, output_dim: 384, max_length: 256}
features: {layers: [8, 12, 16, 20, 24, 27, 30], poolings: [mean, last_token], token_layer: 20}
data: {datasets: [dstc11_track5_val_reviewdoc, scifact_train], dev_fraction: 0.1, test_fraction: 0.2}
loss: {alignment: 1.0, contrastive: 0.1, rank: 0.1, top_k: 128}
train: {lr: 2.0e-4, batch_size: 64, max_steps: 1500, warmup_ratio: 0.05, eval_every: 250, seed: 0}
```

Unknown keys are errors naming the key (a typo in a recipe must not silently train something else).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from retrieval_head.core.config import FEATURE_POOLINGS, HEAD_TYPES, POOLINGS, TEMPLATES, RetrievalHeadConfig
from retrieval_head.core.errors import RetrievalHeadError
from retrieval_head.io.embedded import BASE_ID, TEACHER_ID


class RecipeError(RetrievalHeadError, ValueError):
    """A recipe file or value is invalid; the message names the file and the key."""


class RecipeMismatchError(RecipeError):
    """A run is resumed with a recipe that differs from the one it started with."""


@dataclass
class ModelSpec:
    model: str = BASE_ID
    revision: str | None = None
    dtype: str = "auto"  # auto (bfloat16 where native, else float32) | float32 | bfloat16 | float16: the frozen base's


@dataclass
class TeacherSpec:
    model: str = TEACHER_ID
    revision: str | None = None
    max_tokens: int | None = None  # None: the teacher's max_seq_length; conversations are cut from the left
    batch_size: int = 64


HEAD_FIELDS = (
    "layer", "pooling", "head_type", "inner_dim", "num_head_layers", "num_attention_heads", "dropout", "static_dim",
    "static_base_embeddings", "static_span", "output_dim", "normalize", "query_template", "system_prompt", "max_length",
    "quantize_to",
)
"""The `RetrievalHeadConfig` fields a recipe's `head:` section sets (the rest come from the base, teacher, seed)."""
HEAD_DEFAULTS: dict[str, Any] = {"layer": 24, "pooling": "attention", "inner_dim": 2048, "static_dim": 256,
                                 "output_dim": None, "max_length": 256, "quantize_to": "float16"}
"""Where the recipe's default differs from the config's: layer, pooling, MLP and static width chosen on dev
(EXPERIMENTS.md), the teacher's own dim (None), its max_seq_length, and float16 weights at CPU inference (fp32
retention to 0.1 point, half the bytes read per query: benchmarks/results/quantization.md)."""


def _head_spec() -> type:
    """`HeadSpec`: the config's own fields (types and help), with the recipe's defaults: one schema, not two."""
    by_name = {f.name: f for f in fields(RetrievalHeadConfig)}
    specs = []
    for name in HEAD_FIELDS:
        f = by_name[name]
        kind = "int | None" if name == "output_dim" else f.type
        specs.append((name, kind, field(default=HEAD_DEFAULTS.get(name, f.default), metadata=f.metadata)))
    spec = dataclasses.make_dataclass("HeadSpec", specs)
    spec.__module__ = __name__
    return spec


HeadSpec = _head_spec()


@dataclass
class FeatureSpec:
    layers: list[int] = field(default_factory=lambda: [0, 20, 24])
    poolings: list[str] = field(default_factory=lambda: ["mean"])
    token_layer: int | None = 24  # the span tokens' states at this layer, which attention pooling reads
    batch_size: int = 16
    cache_dir: str = ".cache/features"
    # read-only cache folders searched before computing (e.g. teacher document embeddings shipped in the repo)
    read_only_caches: list[str] = field(default_factory=lambda: ["data/teacher-embeddings"])


@dataclass
class DataSpec:
    root: str = "data"
    datasets: list[str] = field(default_factory=lambda: [
        "dstc11_track5_val_reviewdoc", "scifact_train", "covidqa", "nq_open_oracle"])
    eval_datasets: list[str] = field(default_factory=lambda: [
        "dstc11_track5_val_reviewdoc", "scifact_train", "covidqa", "nq_open_oracle"])
    dev_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    max_train_queries: int | None = None  # per dataset; None = every train query
    max_dev_queries: int | None = None  # per eval dataset; None = all
    max_test_queries: int | None = None  # per eval dataset; None = all
    corpus_texts: int | None = 4096  # per dataset: corpus sentences as extra label-free alignment texts; None = all
    text_files: list[str] = field(default_factory=list)  # extra plain-text files, one training text a line
    # every earlier user turn of each train dialogue, read with the turns before it, as an extra label-free query
    # (source "<dataset>:dialogues"): query-like conversational text for the alignment losses
    sub_dialogues: bool = False
    sample_seed: int = 0
    # train rows of these sources repeated N times an epoch: "<dataset>", "<dataset>:corpus" or a text file's name
    # (DSTC11 3x, SciFact 6x: chosen on the dev splits, training/EXPERIMENTS.md E12 and E59)
    oversample: dict[str, int] = field(default_factory=lambda: {"dstc11_track5_val_reviewdoc": 3,
                                                                "scifact_train": 6})


@dataclass
class LossSpec:
    alignment: float = 1.0
    contrastive: float = 0.1
    rank: float = 0.1
    alignment_kind: str = "cosine"
    contrastive_temperature: float = 0.05
    rank_temperature: float = 0.05
    top_k: int = 128
    gold_positives: bool = False  # qrels as contrastive positives: DOMAIN ADAPTATION, not retention
    hard_negatives: int = 0  # teacher-ranked non-gold docs per query as extra negatives (with gold_positives)


@dataclass
class TrainSpec:
    lr: float = 2e-4
    static_lr_scale: float = 1.0  # the static branch's table learns at lr * this (its rows see sparse updates)
    static_init: str = "lexical"  # random | lexical: the table starts as the teacher's vectors of the token strings
    weight_decay: float = 0.01
    token_dropout: float = 0.1  # train only: each span id of the static branch dropped with this probability
    span_dropout: float = 0.0  # train only, token-level heads: each span token (state and id) left out of the pooling
    feature_dropout: float = 0.0  # train only: dropout on the head's pooled LM features
    ema_decay: float = 0.0  # > 0: evaluate and save an exponential moving average of the weights (0 = off)
    batch_size: int = 64  # per process
    batches: str = "per_dataset"  # per_dataset (each batch from one dataset: in-domain negatives) | mixed (any rows)
    grad_accum: int = 1
    max_steps: int = 12000  # optimizer steps (chosen on the dev splits, training/EXPERIMENTS.md)
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    seed: int = 0
    eval_every: int = 500
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    best_metric: str = "ndcg@10"  # mean retention of this metric over the dev sets picks the best checkpoint
    keep: str = "last"  # the head written to the run folder: last (the schedule's end) | best (its best dev eval)


@dataclass
class ProbeSpec:
    enabled: bool = True
    select: bool = False  # True: train at the probe's best layer/pooling instead of head.layer/pooling
    ridge: float = 1.0
    metric: str = "ndcg@10"


SECTIONS: dict[str, type] = {
    "base": ModelSpec, "teacher": TeacherSpec, "head": HeadSpec, "features": FeatureSpec,
    "data": DataSpec, "loss": LossSpec, "train": TrainSpec, "probe": ProbeSpec,
}
# Settings that may change when a run is resumed (they do not change what is trained).
RESUME_MAY_DIFFER = frozenset({
    "train.keep", "train.log_every", "train.save_every", "train.keep_checkpoints", "train.eval_every",
    "features.batch_size", "features.cache_dir", "features.read_only_caches", "data.root", "teacher.batch_size",
})


@dataclass
class Recipe:
    name: str = "smollm2-135m-minilm"
    description: str = (
        "Label-free distillation of all-MiniLM-L6-v2 query embeddings into a head over SmolLM2-135M states."
    )
    base: ModelSpec = field(default_factory=ModelSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    head: HeadSpec = field(default_factory=HeadSpec)
    features: FeatureSpec = field(default_factory=FeatureSpec)
    data: DataSpec = field(default_factory=DataSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    probe: ProbeSpec = field(default_factory=ProbeSpec)

    def __post_init__(self) -> None:
        self.validate()

    # --- validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise `RecipeError` naming the key when a value is out of range or inconsistent."""
        h, f, d, lo, t = self.head, self.features, self.data, self.loss, self.train
        _check(h.pooling in POOLINGS, "head.pooling", h.pooling, f"one of {POOLINGS}")
        _check(h.head_type in HEAD_TYPES, "head.head_type", h.head_type, f"one of {HEAD_TYPES}")
        _check(h.query_template in TEMPLATES, "head.query_template", h.query_template, f"one of {TEMPLATES}")
        _check(0 <= h.dropout < 1, "head.dropout", h.dropout, "in [0, 1)")
        for key, value in (("head.inner_dim", h.inner_dim), ("head.max_length", h.max_length),
                           ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum),
                           ("train.max_steps", t.max_steps), ("loss.top_k", lo.top_k),
                           ("train.eval_every", t.eval_every), ("train.save_every", t.save_every),
                           ("train.log_every", t.log_every), ("features.batch_size", f.batch_size),
                           ("teacher.batch_size", self.teacher.batch_size)):
            _check(isinstance(value, int) and value > 0, key, value, "a positive integer")
        _check(h.output_dim is None or h.output_dim > 0, "head.output_dim", h.output_dim, "positive or null")
        _check(bool(f.layers), "features.layers", f.layers, "a non-empty list of layer indices")
        _check(all(isinstance(x, int) and x >= 0 for x in f.layers), "features.layers", f.layers,
               "indices into output_hidden_states (0 = embeddings, >= 0)")
        _check(set(f.poolings) <= set(FEATURE_POOLINGS) and bool(f.poolings), "features.poolings", f.poolings,
               f"a subset of {FEATURE_POOLINGS}")
        if h.head_type == "transformer" or h.pooling == "attention":
            _check(f.token_layer is not None, "features.token_layer", f.token_layer,
                   "set (a transformer head or attention pooling reads span tokens of that layer)")
        else:
            _check(h.pooling in f.poolings, "head.pooling", h.pooling, f"among features.poolings {f.poolings}")
        _check(0 <= d.dev_fraction < 1 and 0 <= d.test_fraction < 1 and d.dev_fraction + d.test_fraction < 1,
               "data.dev_fraction/test_fraction", (d.dev_fraction, d.test_fraction), "fractions summing below 1")
        _check(bool(d.datasets) or bool(d.text_files), "data.datasets", d.datasets, "at least one dataset or text file")
        _check(set(d.eval_datasets) <= set(d.datasets), "data.eval_datasets", d.eval_datasets,
               f"a subset of data.datasets {d.datasets}")
        for key in ("max_train_queries", "max_dev_queries", "max_test_queries"):
            value = getattr(d, key)
            _check(value is None or value > 0, f"data.{key}", value, "positive or null")
        _check(d.corpus_texts is None or d.corpus_texts >= 0, "data.corpus_texts", d.corpus_texts, ">= 0 or null")
        _check(all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in d.oversample.values()),
               "data.oversample", d.oversample, "a mapping of source name -> integer >= 1")
        sources = (set(d.datasets) | {f"{n}:{kind}" for n in d.datasets for kind in ("corpus", "dialogues")}
                   | {Path(p).name for p in d.text_files})
        _check(set(d.oversample) <= sources, "data.oversample", d.oversample,
               f"names among the recipe's sources {sorted(sources)}; set data.oversample to {{}} (or name "
               "sources of data.datasets) when you change data.datasets")
        _check(lo.alignment_kind in ("cosine", "mse"), "loss.alignment_kind", lo.alignment_kind, "cosine or mse")
        weights = (lo.alignment, lo.contrastive, lo.rank)
        _check(all(w >= 0 for w in weights) and any(w > 0 for w in weights), "loss weights", weights,
               "non-negative with at least one > 0")
        _check(lo.contrastive_temperature > 0 and lo.rank_temperature > 0, "loss temperatures",
               (lo.contrastive_temperature, lo.rank_temperature), "positive")
        _check(lo.hard_negatives >= 0, "loss.hard_negatives", lo.hard_negatives, ">= 0")
        _check(lo.hard_negatives == 0 or lo.gold_positives, "loss.hard_negatives", lo.hard_negatives,
               "0 unless loss.gold_positives is true (negatives are 'teacher-ranked but not gold')")
        _check(t.lr > 0, "train.lr", t.lr, "positive")
        _check(t.static_lr_scale >= 0, "train.static_lr_scale", t.static_lr_scale, ">= 0 (0 = a frozen table)")
        _check(t.static_init in ("random", "lexical"), "train.static_init", t.static_init, "random or lexical")
        _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
        for name in ("token_dropout", "span_dropout", "feature_dropout", "ema_decay"):
            _check(0 <= getattr(t, name) < 1, f"train.{name}", getattr(t, name), "in [0, 1)")
        _check(0 <= t.warmup_ratio < 1, "train.warmup_ratio", t.warmup_ratio, "in [0, 1)")
        _check(t.mixed_precision in ("auto", "no", "bf16", "fp16"), "train.mixed_precision", t.mixed_precision,
               "auto, no, bf16 or fp16")
        _check(self.base.dtype in ("auto", "float32", "bfloat16", "float16"), "base.dtype", self.base.dtype,
               "auto, float32, bfloat16 or float16")
        _check(t.best_metric in ("ndcg@10", "recall@10", "mrr@10", "cosine"), "train.best_metric", t.best_metric,
               "ndcg@10, recall@10, mrr@10 or cosine")
        _check(t.keep in ("last", "best"), "train.keep", t.keep, "last or best")
        _check(t.batches in ("mixed", "per_dataset"), "train.batches", t.batches, "mixed or per_dataset")

    # --- (de)serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe must be a mapping of sections, got {type(data).__name__}")
        top = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - top)
        if unknown:
            raise RecipeError(f"{source}: unknown key(s) {unknown}; known: {sorted(top)}")
        kwargs: dict[str, Any] = {k: data[k] for k in ("name", "description") if k in data}
        for section, spec in SECTIONS.items():
            values = data.get(section) or {}
            if not isinstance(values, dict):
                raise RecipeError(f"{source}: section {section!r} must be a mapping, got {values!r}")
            known = {f.name: f for f in fields(spec)}
            unknown = sorted(set(values) - set(known))
            if unknown:
                raise RecipeError(f"{source}: unknown key(s) {[f'{section}.{k}' for k in unknown]}; "
                                  f"known in {section!r}: {sorted(known)}")
            kwargs[section] = spec(**{k: _coerce(source, f"{section}.{k}", v, known[k]) for k, v in values.items()})
        try:
            return cls(**kwargs)
        except RecipeError as err:
            raise RecipeError(f"{source}: {err}") from None

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML ({err})") from None
        return cls.from_dict(data or {}, source=str(path))

    def replace(self, **overrides: Any) -> Recipe:
        """A copy with dotted overrides applied, e.g. `replace(**{"train.lr": 1e-4})`."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if key:
                data.setdefault(section, {})[key] = value
            else:
                data[section] = value
        return Recipe.from_dict(data, source="overrides")

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`--set SECTION.KEY=VALUE` arguments as `Recipe.replace` overrides (values parsed as YAML)."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise RecipeError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. train.lr=1e-4")
        values[key] = yaml.safe_load(value)
    return values


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise RecipeError(f"{key}={value!r} is invalid: expected {expected}")


def _coerce(source: str, key: str, value: Any, spec_field: dataclasses.Field) -> Any:
    """YAML gives `2e-4` as a string: turn numeric strings into floats for float fields; check basic types."""
    kind = str(spec_field.type)
    if value is None:
        if "None" not in kind:
            raise RecipeError(f"{source}: {key} may not be null")
        return None
    if kind.startswith("float"):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{source}: {key}={value!r} is not a number") from None
    if kind.startswith("int") and (isinstance(value, bool) or not isinstance(value, int)):
        raise RecipeError(f"{source}: {key}={value!r} is not an integer")
    if kind == "bool" and not isinstance(value, bool):
        raise RecipeError(f"{source}: {key}={value!r} is not true/false")
    if kind.startswith("list") and not isinstance(value, list):
        raise RecipeError(f"{source}: {key}={value!r} is not a list")
    if kind.startswith("dict") and not isinstance(value, dict):
        raise RecipeError(f"{source}: {key}={value!r} is not a mapping")
    return value


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def diff_recipes(old: Recipe | dict[str, Any], new: Recipe | dict[str, Any],
                 ignore: frozenset[str] = frozenset()) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every setting that differs (keys in `ignore` skipped)."""
    a = _flatten(old.to_dict() if isinstance(old, Recipe) else old)
    b = _flatten(new.to_dict() if isinstance(new, Recipe) else new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)}


def check_resumable(saved: Recipe | dict[str, Any], current: Recipe, where: str) -> None:
    """Raise `RecipeMismatchError` naming each difference that matters between a run's recipe and this one."""
    diffs = diff_recipes(saved, current, ignore=RESUME_MAY_DIFFER)
    if diffs:
        detail = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diffs.items()))
        raise RecipeMismatchError(
            f"refusing to resume {where}: the recipe differs from the one the run started with ({detail}). "
            "Resume with the original recipe, or start a new run in another output folder (or without --resume)."
        )
