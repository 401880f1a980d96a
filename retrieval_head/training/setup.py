"""What a training run is set up from: the models, the head config and the caches a recipe names."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from retrieval_head.core.base import native_bfloat16
from retrieval_head.core.config import RetrievalHeadConfig
from retrieval_head.core.errors import RetrievalHeadError
from retrieval_head.io.tensor_cache import LayeredCache, TensorCache
from retrieval_head.retrieval.fingerprint import TeacherFingerprint
from retrieval_head.training.features import feature_key
from retrieval_head.training.recipe import Recipe, RecipeError

if TYPE_CHECKING:
    from retrieval_head.training.datasets import TrainingData


class TeacherDimError(RetrievalHeadError, ValueError):
    """The teacher's embedding size differs from the recipe's `head.output_dim`."""


def mixed_precision(recipe: Recipe) -> str:
    """The recipe's precision; "auto" = bf16 on GPUs that support it, fp16 on other GPUs, none on CPU."""
    value = recipe.train.mixed_precision
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def check_teacher_dim(recipe: Recipe, fingerprint: TeacherFingerprint) -> int:
    """The output dim to train: the teacher's; raises `TeacherDimError` when the recipe names another."""
    wanted = recipe.head.output_dim
    if wanted is not None and wanted != fingerprint.dim:
        raise TeacherDimError(
            f"head.output_dim={wanted} in recipe {recipe.name!r}, but teacher {fingerprint.describe()!r} embeds into "
            f"{fingerprint.dim} dimensions; set head.output_dim to {fingerprint.dim} (or null) or use another teacher."
        )
    return fingerprint.dim


def head_config(recipe: Recipe, fingerprint: TeacherFingerprint, layer: int | None = None,
                pooling: str | None = None) -> RetrievalHeadConfig:
    values = asdict(recipe.head)
    values.update(layer=values["layer"] if layer is None else layer, pooling=values["pooling"] if pooling is None
                  else pooling, output_dim=check_teacher_dim(recipe, fingerprint))
    return RetrievalHeadConfig(base_model_name_or_path=recipe.base.model, revision=recipe.base.revision,
                               seed=recipe.train.seed, teacher=fingerprint.to_dict(), **values)


def feature_for(recipe: Recipe, config: RetrievalHeadConfig) -> tuple[str, bool]:
    """(cached feature name, token-level?) the head reads; raises when the recipe did not extract it."""
    index = config.resolve_layer(config.base_num_layers)
    f = recipe.features
    if config.head_type == "transformer" or config.pooling == "attention":
        if f.token_layer != index:
            raise RecipeError(
                f"a {config.head_type} head with {config.pooling} pooling at layer {config.layer} (index {index}) "
                "reads span tokens of that layer, but "
                f"features.token_layer={f.token_layer}; set features.token_layer: {index}"
            )
        return f"tokens.L{index}", True
    if index not in f.layers or config.pooling not in f.poolings:
        raise RecipeError(f"head layer {config.layer} (index {index}) / pooling {config.pooling!r} is not among the "
                          f"extracted features (features.layers={f.layers}, poolings={f.poolings})")
    return feature_key(config.pooling, index), False


def base_dtype(name: str) -> torch.dtype:
    """The frozen base's precision for `base.dtype`: `auto` is bfloat16 where this machine runs it natively (a GPU
    that supports it, a CPU with AVX-512-BF16 or AMX: the LM pass ~1.8x faster, pooled features at cosine 0.99996
    to fp32, see benchmarks/results/extraction.md), else float32."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16() else torch.float32
    return getattr(torch, name)


def load_models(recipe: Recipe, device: Any = None) -> tuple[Any, Any, Any]:
    """(base, tokenizer, teacher) named by the recipe (the packaged copies for the embedded defaults)."""
    from retrieval_head.io.embedded import load_base, load_teacher_by_id

    teacher = load_teacher_by_id(recipe.teacher.model, recipe.teacher.revision, device=str(device) if device else None)
    base, tokenizer = load_base(recipe.base.model, recipe.base.revision, dtype=base_dtype(recipe.base.dtype))
    if device is not None:
        base.to(device)
    return base, tokenizer, teacher


def recipe_cache(recipe: Recipe) -> TensorCache:
    """The recipe's cache folder, layered over its read-only caches (resolved like data folders)."""
    from retrieval_head.training.datasets import resolve_data_path

    extra = [resolve_data_path(str(Path(p).parent), Path(p).name) for p in recipe.features.read_only_caches]
    return LayeredCache(recipe.features.cache_dir, extra) if extra else TensorCache(recipe.features.cache_dir)


def kept_step(recipe: Recipe, state: dict[str, Any]) -> int | None:
    """The step whose weights the run folder holds (`train.keep`: the last step, or the best dev evaluation)."""
    return state["best_step"] if recipe.train.keep == "best" else state["step"]


def training_summary(recipe: Recipe, state: dict[str, Any], data: TrainingData, base_dtype: str) -> dict[str, Any]:
    """What the card's training table shows (the full recipe is `recipe.yaml` beside the head); `base_dtype` is
    the precision the base's features were extracted in (`base.dtype: auto` depends on the machine)."""
    t, lo = recipe.train, recipe.loss
    counts = {s.name: len(s.splits.get("train", [])) for s in data.sources}
    return {
        "recipe": recipe.name, "recipe_sha": recipe.fingerprint(),
        "losses": {k: v for k, v in (("alignment", lo.alignment), ("contrastive", lo.contrastive),
                                     ("rank", lo.rank)) if v > 0},
        "gold_positives": lo.gold_positives, "top_k": lo.top_k, "lr": t.lr, "batch_size": t.batch_size,
        "grad_accum": t.grad_accum, "steps": state["step"], "best_step": state["best_step"],
        "kept": recipe.train.keep, "kept_step": kept_step(recipe, state),
        "warmup_ratio": t.warmup_ratio, "seed": t.seed, "base_dtype": base_dtype,
        "train_examples": sum(counts.values()), "train_sources": counts, "datasets": list(recipe.data.datasets),
        "split": {"dev": recipe.data.dev_fraction, "test": recipe.data.test_fraction, "seed": recipe.data.split_seed},
    }
