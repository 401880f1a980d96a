"""The trainer: a head fitted on cached features with `accelerate` (1 CPU, N CPU processes, 1 or N GPUs).

One call, `train(recipe, output_dir)`, does the whole run:

1. loads the teacher and checks its dim against the recipe's `head.output_dim` (before anything is computed);
2. loads the frozen base and attaches a fresh head (seeded);
3. builds the examples (LM features and teacher embeddings from the caches; rank 0 fills them first);
4. runs the layer/pooling probe (ridge regression per cached feature) and records it;
5. trains `head.project_features` -- exact, since the head's input features are weight-free -- with AdamW,
   warmup + cosine, gradient accumulation, mixed precision where the device supports it, DDP under
   `accelerate launch`; evaluates retention vs the teacher on the dev splits every `eval_every` steps and
   keeps the best head; saves `accelerator.save_state` checkpoints every `save_every` steps;
6. evaluates the best head on the test splits, writes it (safetensors + config + card) into `output_dir`
   with the recipe, the JSONL log and the report.

A run resumes from its last checkpoint (`resume=True`) only with the recipe it started with; a non-finite
loss stops it with a message and leaves the last good checkpoint and best head in place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cache import LayeredCache, TensorCache
from ..config import RetrievalHeadConfig
from ..features import feature_key
from ..fingerprint import TeacherFingerprint
from ..persistence import save_head
from .datasets import ExampleSet, TrainingData, build_training_data
from .evaluation import SplitEvaluator, format_report, score
from .recipe import Recipe, RecipeError, check_resumable

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
LOG_FILE = "train_log.jsonl"
REPORT_FILE = "report.json"
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
BEST = "best"


class TeacherDimError(ValueError):
    """The teacher's embedding size differs from the recipe's `head.output_dim`."""


class TrainingStopped(RuntimeError):
    """Training stopped early (non-finite loss); the message says where the last good state is."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    best_step: int | None
    best_score: float | None
    dev: dict[str, Any] | None
    test: dict[str, Any] | None
    probe: dict[str, Any] | None
    seconds: float
    stopped: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


class FeatureHead(nn.Module):
    """`head.project_features` as a module's forward, so DDP's hooks see (and sync) the gradients."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None,
                span_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.head.project_features(features, mask, span_ids)


class EpochOrder(torch.utils.data.Dataset):
    """Example indices in a seeded order per epoch (`use_epoch`), so a run and its resumed copy agree.

    Not named `set_epoch`: accelerate calls a dataset's `set_epoch` with its own count of iterations over the
    loader, which restarts at 0 for the loader `skip_first_batches` returns on resume.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.use_epoch(0)

    def use_epoch(self, epoch: int) -> None:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        self.order = torch.randperm(self.size, generator=generator).tolist()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> int:
        return self.order[i]


def parameter_groups(head: nn.Module, lr: float, static_lr_scale: float) -> list[dict[str, Any]]:
    """AdamW groups: the static branch's table (rows updated only when their token occurs) at `lr * scale`."""
    static = [p for n, p in head.named_parameters() if ".static." in f".{n}"]
    rest = [p for n, p in head.named_parameters() if ".static." not in f".{n}"]
    groups = [{"params": rest, "lr": lr}]
    if static:
        groups.append({"params": static, "lr": lr * static_lr_scale})
    return groups


def _on(device: Any, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors on `device` (None stays None)."""
    return [None if t is None else t.to(device) for t in tensors]


# --- set-up helpers -----------------------------------------------------------------------------------
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
    h = recipe.head
    return RetrievalHeadConfig(
        base_model_name_or_path=recipe.base.model, revision=recipe.base.revision,
        layer=h.layer if layer is None else layer, pooling=h.pooling if pooling is None else pooling,
        head_type=h.head_type, inner_dim=h.inner_dim, num_head_layers=h.num_head_layers,
        num_attention_heads=h.num_attention_heads, dropout=h.dropout, static_dim=h.static_dim,
        static_base_embeddings=h.static_base_embeddings,
        output_dim=check_teacher_dim(recipe, fingerprint),
        normalize=h.normalize, seed=recipe.train.seed, query_template=h.query_template, system_prompt=h.system_prompt,
        max_length=h.max_length, teacher=fingerprint.to_dict(),
    )


def feature_for(recipe: Recipe, config: RetrievalHeadConfig) -> tuple[str, bool]:
    """(cached feature name, token-level?) the head reads; raises when the recipe did not extract it."""
    index = config.resolve_layer(config.base_num_layers)
    f = recipe.features
    if config.head_type == "transformer":
        if f.token_layer != index:
            raise RecipeError(
                f"a transformer head at layer {config.layer} (index {index}) reads span tokens of that layer, but "
                f"features.token_layer={f.token_layer}; set features.token_layer: {index}"
            )
        return f"tokens.L{index}", True
    if index not in f.layers or config.pooling not in f.poolings:
        raise RecipeError(f"head layer {config.layer} (index {index}) / pooling {config.pooling!r} is not among the "
                          f"extracted features (features.layers={f.layers}, poolings={f.poolings})")
    return feature_key(config.pooling, index), False


def _dtype(name: str) -> torch.dtype | None:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def load_models(recipe: Recipe, device: Any = None) -> tuple[Any, Any, Any]:
    """(base, tokenizer, teacher) named by the recipe (the packaged copies for the embedded defaults)."""
    from ..defaults import load_base, load_teacher_by_id

    teacher = load_teacher_by_id(recipe.teacher.model, recipe.teacher.revision, device=str(device) if device else None)
    base, tokenizer = load_base(recipe.base.model, recipe.base.revision, dtype=_dtype(recipe.base.dtype))
    if device is not None:
        base.to(device)
    return base, tokenizer, teacher


def recipe_cache(recipe: Recipe) -> TensorCache:
    """The recipe's cache folder, layered over its read-only caches (resolved like data folders)."""
    from .datasets import resolve_data_path

    extra = [resolve_data_path(str(Path(p).parent), Path(p).name) for p in recipe.features.read_only_caches]
    return LayeredCache(recipe.features.cache_dir, extra) if extra else TensorCache(recipe.features.cache_dir)


# --- the run ----------------------------------------------------------------------------------------------
class Trainer:
    """See the module docstring. Tests pass tiny `base`/`tokenizer`/`teacher` objects instead of loading."""

    def __init__(
        self,
        recipe: Recipe,
        output_dir: str | Path,
        resume: bool = False,
        base: Any = None,
        tokenizer: Any = None,
        teacher: Any = None,
        accelerator: Any = None,
        stop_after_steps: int | None = None,
        show_progress_bar: bool = True,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.recipe = recipe
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.stop_after_steps = stop_after_steps
        self.show = show_progress_bar
        self.on_step = on_step
        # cpu=True without a GPU: only then does accelerate turn a multi-process launch into DDP over gloo
        # (DistributedType.MULTI_CPU); with cpu=False every process would train alone (DistributedType.NO).
        self.accelerator = accelerator or Accelerator(
            mixed_precision=mixed_precision(recipe), gradient_accumulation_steps=recipe.train.grad_accum,
            cpu=not torch.cuda.is_available())
        set_seed(recipe.train.seed)
        self.timings: dict[str, float] = {}
        self._check_output_dir()
        started = time.perf_counter()
        if teacher is None or base is None:
            loaded_base, loaded_tok, loaded_teacher = load_models(recipe, self.accelerator.device)
            base = loaded_base if base is None else base
            tokenizer = loaded_tok if tokenizer is None else tokenizer
            teacher = loaded_teacher if teacher is None else teacher
        self.teacher = teacher
        self.fingerprint = TeacherFingerprint.from_sentence_transformer(teacher, teacher_id=recipe.teacher.model,
                                                                        revision=recipe.teacher.revision)
        config = head_config(recipe, self.fingerprint)  # raises TeacherDimError before any work
        from ..model import get_retrieval_model

        self.model = get_retrieval_model(base, config, tokenizer)
        feature_for(recipe, self.model.config)  # fail fast on a layer the recipe does not extract
        self.timings["load_s"] = time.perf_counter() - started

    # -- output folder / resume ----------------------------------------------------------------------
    def _check_output_dir(self) -> None:
        saved = self.output_dir / RECIPE_FILE
        has_run = (self.output_dir / CHECKPOINTS).is_dir() and any((self.output_dir / CHECKPOINTS).iterdir())
        if self.resume:
            if saved.is_file():
                check_resumable(Recipe.load(saved), self.recipe, where=str(self.output_dir))
        elif has_run:
            raise FileExistsError(
                f"{self.output_dir} already holds a training run (checkpoints/); pass --resume to continue it "
                "or choose another --output folder."
            )

    def latest_checkpoint(self) -> Path | None:
        folder = self.output_dir / CHECKPOINTS
        steps = sorted((int(p.name.split("-")[1]), p) for p in folder.glob("step-*") if (p / STATE_FILE).is_file())
        return steps[-1][1] if steps else None

    def _log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with (self.output_dir / LOG_FILE).open("a", encoding="utf-8") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}, sort_keys=True) + "\n")

    # -- data ----------------------------------------------------------------------------------------
    def build_data(self) -> TrainingData:
        started = time.perf_counter()
        cache = recipe_cache(self.recipe)
        with self.accelerator.main_process_first():
            data = build_training_data(self.recipe, self.model, self.teacher, self.fingerprint, cache,
                                       show_progress_bar=self.show and self.accelerator.is_main_process)
        self.timings["data_s"] = time.perf_counter() - started
        return data

    # -- the loop ------------------------------------------------------------------------------------
    def run(self, data: TrainingData | None = None) -> TrainResult:
        acc, recipe, t = self.accelerator, self.recipe, self.recipe.train
        started = time.perf_counter()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            recipe.save(self.output_dir / RECIPE_FILE)
        acc.wait_for_everyone()
        data = data or self.build_data()

        probe = None
        if recipe.probe.enabled and recipe.head.head_type != "transformer":
            probe_started = time.perf_counter()
            from .probe import run_probe

            probe = run_probe(data, recipe.probe.ridge, recipe.probe.metric)
            self.timings["probe_s"] = time.perf_counter() - probe_started
            if recipe.probe.select:
                from ..model import get_retrieval_model

                best = probe["best"]
                config = head_config(recipe, self.fingerprint, layer=best["layer"], pooling=best["pooling"])
                self.model = get_retrieval_model(self.model.base_model, config, self.model.tokenizer)
        self.model.config.probe = probe
        key, token_level = feature_for(recipe, self.model.config)
        train_set = data.examples("train", key, token_level)
        dev_eval = SplitEvaluator(data, "dev", key, token_level) if acc.is_main_process else None

        resuming = self.resume and self.latest_checkpoint() is not None  # the checkpoint holds the table
        if t.static_init == "lexical" and self.model.head.static is not None and not resuming:
            from .lexical_init import init_static_branch

            rows = list(range(len(train_set)))
            init_static_branch(self.model.head, self.model.tokenizer, self.teacher, self.fingerprint,
                               recipe_cache(recipe), train_set.span_ids(rows), train_set.teacher.float(),
                               show_progress_bar=self.show and acc.is_main_process)
        head = FeatureHead(self.model.head)
        head.train()
        optimizer = torch.optim.AdamW(parameter_groups(head, t.lr, t.static_lr_scale), lr=t.lr,
                                      weight_decay=t.weight_decay)
        from transformers import get_cosine_schedule_with_warmup

        scheduler = get_cosine_schedule_with_warmup(optimizer, int(t.warmup_ratio * t.max_steps), t.max_steps)
        order = EpochOrder(len(train_set), t.seed)
        drop_last = len(train_set) >= t.batch_size * acc.num_processes
        loader = torch.utils.data.DataLoader(order, batch_size=t.batch_size, shuffle=False, drop_last=drop_last,
                                             collate_fn=train_set.batch,
                                             # its own generator: starting an iterator must not draw from the
                                             # global RNG (dropout's), or a resumed run would drift from the original
                                             generator=torch.Generator().manual_seed(t.seed))
        head, optimizer, loader = acc.prepare(head, optimizer, loader)
        acc.register_for_checkpointing(scheduler)
        documents = data.documents.to(acc.device)
        from ..losses import DistillationLoss

        lo = recipe.loss
        loss_fn = DistillationLoss({"alignment": lo.alignment, "contrastive": lo.contrastive, "rank": lo.rank},
                                   lo.alignment_kind, lo.contrastive_temperature, lo.rank_temperature, lo.top_k)

        state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_score": None, "best_step": None}
        checkpoint = self.latest_checkpoint() if self.resume else None
        if checkpoint is not None:
            acc.load_state(str(checkpoint))
            state.update(json.loads((checkpoint / STATE_FILE).read_text()))
            self._log({"event": "resumed", "checkpoint": checkpoint.name, "step": state["step"]})
            logger.info("Resumed from %s (step %d)", checkpoint, state["step"])
        elif self.resume:
            logger.info("Nothing to resume in %s; starting from step 0", self.output_dir)

        if state["step"] == 0:
            self._log({"event": "start", "recipe": recipe.name, "train_examples": len(train_set),
                       "processes": acc.num_processes, "mixed_precision": acc.mixed_precision, "feature": key,
                       "probe_best": probe and probe["best"]})
        stopped = None
        last_dev = None
        train_started = time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(total=t.max_steps, initial=state["step"], desc="training head",
                   disable=not (self.show and acc.is_main_process))
        while state["step"] < t.max_steps and stopped is None:
            order.use_epoch(state["epoch"])
            batches = acc.skip_first_batches(loader, state["batch_in_epoch"]) if state["batch_in_epoch"] else loader
            for batch in batches:
                state["batch_in_epoch"] += 1
                reason = "a non-finite loss on another process"
                with acc.accumulate(head):
                    try:
                        student = head(batch["features"], batch.get("mask"), batch.get("span_ids"))
                        total, parts = self._loss(loss_fn, student, batch, documents)
                        bad = torch.zeros((), device=acc.device)
                    except FloatingPointError as err:
                        parts, bad, reason = {}, torch.ones((), device=acc.device), str(err)
                    if acc.num_processes > 1:
                        bad = acc.reduce(bad, reduction="sum")
                    if float(bad) > 0:
                        stopped = self._stop_message(state, reason)
                        break
                    acc.backward(total)
                    if acc.sync_gradients and t.max_grad_norm:
                        acc.clip_grad_norm_(head.parameters(), t.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                if not acc.sync_gradients:
                    continue
                scheduler.step()
                state["step"] += 1
                bar.update(1)
                if self.on_step is not None:
                    self.on_step(state["step"], parts)
                if state["step"] % t.log_every == 0 or state["step"] == 1:
                    self._log({"step": state["step"], "epoch": state["epoch"], "lr": scheduler.get_last_lr()[0],
                               **{f"loss/{k}": round(v, 6) for k, v in parts.items()}})
                if state["step"] % t.eval_every == 0 or state["step"] == t.max_steps:
                    last_dev = self._evaluate(head, dev_eval, state)
                if state["step"] % t.save_every == 0 or state["step"] == t.max_steps:
                    self._save_checkpoint(state)
                if self.stop_after_steps is not None and state["step"] >= self.stop_after_steps:
                    stopped = f"stopped after step {state['step']} (stop_after_steps)"
                    break
                if state["step"] >= t.max_steps:
                    break
            else:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
        bar.close()
        self.timings["train_s"] = time.perf_counter() - train_started
        acc.wait_for_everyone()
        if stopped is not None:
            if acc.is_main_process:
                logger.error(stopped)
            self._log({"event": "stopped", "step": state["step"], "reason": stopped})
            if "stop_after_steps" in stopped:
                return self._result(state, last_dev, None, probe, started, stopped)
            raise TrainingStopped(stopped)

        test = self._finish(data, key, token_level, state) if acc.is_main_process else None
        acc.wait_for_everyone()
        return self._result(state, last_dev, test, probe, started, None)

    def _loss(self, loss_fn: Any, student: torch.Tensor, batch: dict[str, torch.Tensor],
              documents: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        lo = self.recipe.loss
        kwargs: dict[str, Any] = {}
        if lo.rank > 0:
            kwargs["rank_documents"] = documents
            kwargs["top_k_indices"] = batch["top_k"]
        if lo.contrastive > 0 and not lo.gold_positives and self.accelerator.num_processes > 1:
            from ..losses import gathered_candidates

            kwargs["candidates"], kwargs["positives"] = gathered_candidates(
                batch["teacher"], self.accelerator.gather, self.accelerator.process_index)
        if lo.contrastive > 0 and lo.gold_positives:
            gold = batch["gold"]
            ids = torch.unique(gold[gold >= 0])
            teacher = batch["teacher"]
            # candidates: the batch's teacher query vectors (each row's own = positive) + the batch's gold docs
            cands = torch.cat([teacher, documents[ids]]) if ids.numel() else teacher
            mask = torch.zeros((gold.shape[0], cands.shape[0]), dtype=torch.bool, device=teacher.device)
            mask[torch.arange(gold.shape[0]), torch.arange(gold.shape[0])] = True
            if ids.numel():
                mask[:, gold.shape[0]:] = (gold.unsqueeze(2) == ids.view(1, 1, -1)).any(dim=1)
            kwargs["candidates"], kwargs["positives"] = cands, mask
            if lo.hard_negatives:
                top = batch["top_k"][:, : lo.hard_negatives + gold.shape[1]]
                is_gold = (top.unsqueeze(2) == gold.unsqueeze(1)).any(dim=2) | (top < 0)
                hard = torch.zeros((gold.shape[0], lo.hard_negatives, documents.shape[1]), device=teacher.device)
                for r in range(gold.shape[0]):
                    picks = top[r][~is_gold[r]][: lo.hard_negatives]
                    hard[r, : picks.numel()] = documents[picks]
                kwargs["hard_negatives"] = hard
        return loss_fn(student, batch["teacher"], **kwargs)

    def _stop_message(self, state: dict[str, Any], reason: str) -> str:
        checkpoint = self.latest_checkpoint()
        where = f"the last good checkpoint is {checkpoint} (resume with --resume)" if checkpoint else \
            "no checkpoint was saved before it"
        best = self.output_dir / BEST
        kept = f"; the best head so far is in {best}" if best.is_dir() else ""
        return (f"Training stopped at step {state['step'] + 1}: {reason}. Nothing was saved after it; {where}{kept}. "
                f"Lower train.lr (now {self.recipe.train.lr}) or check the data for NaN/inf features.")

    def _evaluate(self, head: nn.Module, dev_eval: SplitEvaluator | None, state: dict[str, Any]) -> dict | None:
        acc = self.accelerator
        report = None
        if acc.is_main_process and dev_eval is not None and dev_eval.parts:
            module = acc.unwrap_model(head)
            module.eval()
            report = dev_eval.evaluate(lambda f, m, ids: module(*_on(acc.device, f, m, ids)))
            module.train()
            value = score(report, self.recipe.train.best_metric)
            if value is not None and (state["best_score"] is None or value > state["best_score"]):
                state["best_score"], state["best_step"] = value, state["step"]
                self._save_head(self.output_dir / BEST, module.head)
            self._log({"step": state["step"], "event": "eval", "dev": report, "best_step": state["best_step"]})
        elif acc.is_main_process:  # nothing to evaluate on: the latest head is the best
            state["best_step"] = state["step"]
            self._save_head(self.output_dir / BEST, acc.unwrap_model(head).head)
        # every process keeps the same best_* (they go into the checkpoint state)
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            shared = broadcast_object_list([state["best_score"], state["best_step"]])
            state["best_score"], state["best_step"] = shared
        return report

    def _save_head(self, folder: Path, head: nn.Module) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu() for k, v in head.state_dict().items()}
        save_head(folder, self.model.config, state)

    def _save_checkpoint(self, state: dict[str, Any]) -> None:
        acc = self.accelerator
        folder = self.output_dir / CHECKPOINTS / f"step-{state['step']}"
        acc.save_state(str(folder))
        if acc.is_main_process:
            (folder / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
            old = sorted((int(p.name.split("-")[1]), p) for p in (self.output_dir / CHECKPOINTS).glob("step-*"))
            for _, path in old[: -self.recipe.train.keep_checkpoints]:
                shutil.rmtree(path, ignore_errors=True)
        acc.wait_for_everyone()

    def _finish(self, data: TrainingData, key: str, token_level: bool, state: dict[str, Any]) -> dict[str, Any]:
        """Best head -> test evaluation -> head folder (weights, config with metrics/probe/training, card)."""
        from ..persistence import read_weights

        best = self.output_dir / BEST
        if best.is_dir():
            self.model.head.load_state_dict(read_weights(best))
        head = self.model.head.float().eval()
        if head.static is not None:  # the shipped table is stored in float16: evaluate what is saved
            with torch.no_grad():
                head.static.weight.copy_(head.static.weight.half().float())
        test_eval = SplitEvaluator(data, "test", key, token_level)
        device = next(head.parameters()).device
        test = test_eval.evaluate(lambda f, m, ids: head.project_features(*_on(device, f, m, ids)))
        config = self.model.config
        config.metrics = {name: {"head": e["head"], "teacher": e["teacher"], "split": "test",
                                 "queries": e["queries"], "cosine": round(e["cosine"], 4)}
                          for name, e in test.items() if isinstance(e, dict) and "head" in e}
        config.training = training_summary(self.recipe, state, data)
        report = {"recipe": self.recipe.name, "best_step": state["best_step"], "best_dev_score": state["best_score"],
                  "test": test, "probe": config.probe, "timings": self.timings}
        staging = self.output_dir / ".head-staging"
        shutil.rmtree(staging, ignore_errors=True)
        self.model.save_pretrained(staging)
        for entry in staging.iterdir():
            os.replace(entry, self.output_dir / entry.name)
        staging.rmdir()
        (self.output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        (self.output_dir / "report.txt").write_text(format_report(test, f"{self.recipe.name}: test splits") + "\n")
        self._log({"event": "done", "step": state["step"], "test": test})
        return test

    def _result(self, state: dict[str, Any], dev: Any, test: Any, probe: Any, started: float,
                stopped: str | None) -> TrainResult:
        return TrainResult(self.output_dir, state["step"], state["best_step"], state["best_score"], dev, test, probe,
                           time.perf_counter() - started, stopped, dict(self.timings))


def training_summary(recipe: Recipe, state: dict[str, Any], data: TrainingData) -> dict[str, Any]:
    """What the card's training table shows (the full recipe is `recipe.yaml` beside the head)."""
    t, lo = recipe.train, recipe.loss
    counts = {s.name: len(s.splits.get("train", [])) for s in data.sources}
    return {
        "recipe": recipe.name, "recipe_sha": recipe.fingerprint(),
        "losses": {k: v for k, v in (("alignment", lo.alignment), ("contrastive", lo.contrastive),
                                     ("rank", lo.rank)) if v > 0},
        "gold_positives": lo.gold_positives, "top_k": lo.top_k, "lr": t.lr, "batch_size": t.batch_size,
        "grad_accum": t.grad_accum, "steps": state["step"], "best_step": state["best_step"],
        "warmup_ratio": t.warmup_ratio, "seed": t.seed, "train_examples": sum(counts.values()),
        "train_sources": counts, "datasets": list(recipe.data.datasets),
        "split": {"dev": recipe.data.dev_fraction, "test": recipe.data.test_fraction, "seed": recipe.data.split_seed},
    }


def train(recipe: Recipe, output_dir: str | Path, resume: bool = False, **kwargs: Any) -> TrainResult:
    """Run a recipe into `output_dir` (see `Trainer`)."""
    return Trainer(recipe, output_dir, resume=resume, **kwargs).run()


__all__ = ["ExampleSet", "FeatureHead", "TeacherDimError", "Trainer", "TrainingStopped", "TrainResult", "train"]
