"""The trainer: a head fitted on cached features with `accelerate` (1 CPU, N CPU processes, 1 or N GPUs).

One call, `train(recipe, output_dir)`, does the whole run:

1. loads the teacher and checks its dim against the recipe's `head.output_dim` (before anything is computed);
2. loads the frozen base and attaches a fresh head (seeded);
3. builds the examples (LM features and teacher embeddings from the caches; rank 0 fills them first);
4. runs the layer/pooling probe (ridge regression per cached feature) and records it;
5. trains `head.project_features` -- exact, since the head's input features are weight-free -- with AdamW,
   warmup + cosine, gradient accumulation, mixed precision where the device supports it, DDP under
   `accelerate launch`; evaluates retention vs the teacher on the dev splits every `eval_every` steps and
   keeps the best head in `best/`; saves `accelerator.save_state` checkpoints every `save_every` steps;
6. evaluates the kept head (`train.keep`: the last weights, or the best dev head) on the test splits, writes it
   (safetensors + config + card) into `output_dir`
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

from retrieval_head.core.errors import RetrievalHeadError
from retrieval_head.io.folder import save_head
from retrieval_head.retrieval.fingerprint import TeacherFingerprint
from retrieval_head.training.averaging import weight_average
from retrieval_head.training.datasets import TrainingData, build_training_data, prefill_features
from retrieval_head.training.recipe import Recipe, check_resumable
from retrieval_head.training.setup import (
    feature_for,
    head_config,
    kept_step,
    load_models,
    mixed_precision,
    recipe_cache,
    training_summary,
)
from retrieval_head.training.split_evaluation import SplitEvaluator, format_report, score
from retrieval_head.training.steps import EpochOrder, FeatureHead, adamw, loss_inputs, on_device, regularize

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
LOG_FILE = "train_log.jsonl"
REPORT_FILE = "report.json"
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
BEST = "best"


class TrainingStopped(RetrievalHeadError, RuntimeError):
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
    kept_step: int | None = None  # the step whose weights the run folder holds (`train.keep`)


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
        from retrieval_head.core.model import get_retrieval_model

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
        started, acc, cache = time.perf_counter(), self.accelerator, recipe_cache(self.recipe)
        show = self.show and acc.is_main_process
        if acc.num_processes > 1:  # each process extracts its share of the LM features; rank 0 then reads them all
            prefill_features(self.recipe, self.model, cache, acc.process_index, acc.num_processes, show)
            acc.wait_for_everyone()
        with acc.main_process_first():
            data = build_training_data(self.recipe, self.model, self.teacher, self.fingerprint, cache, show)
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
            from retrieval_head.training.probe import run_probe

            probe = run_probe(data, recipe.probe.ridge, recipe.probe.metric)
            self.timings["probe_s"] = time.perf_counter() - probe_started
            if recipe.probe.select:
                from retrieval_head.core.model import get_retrieval_model

                best = probe["best"]
                config = head_config(recipe, self.fingerprint, layer=best["layer"], pooling=best["pooling"])
                self.model = get_retrieval_model(self.model.base_model, config, self.model.tokenizer)
        self.model.config.probe = probe
        key, token_level = feature_for(recipe, self.model.config)
        train_set = data.examples("train", key, token_level)
        dev_eval = SplitEvaluator(data, "dev", key, token_level) if acc.is_main_process else None

        resuming = self.resume and self.latest_checkpoint() is not None  # the checkpoint holds the table
        if t.static_init == "lexical" and self.model.head.static is not None and not resuming:
            from retrieval_head.training.lexical_init import init_static_branch

            rows = list(range(len(train_set)))
            init_static_branch(self.model.head, self.model.tokenizer, self.teacher, self.fingerprint,
                               recipe_cache(recipe), train_set.span_ids(rows), train_set.teacher.float(),
                               show_progress_bar=self.show and acc.is_main_process)
        head = FeatureHead(self.model.head)
        head.train()
        optimizer = adamw(head, t.lr, t.static_lr_scale, t.weight_decay)
        from transformers import get_cosine_schedule_with_warmup

        scheduler = get_cosine_schedule_with_warmup(optimizer, int(t.warmup_ratio * t.max_steps), t.max_steps)
        groups = data.groups("train") if t.batches == "per_dataset" else None
        order = EpochOrder(len(train_set), t.seed, groups, t.batch_size)
        drop_last = len(train_set) >= t.batch_size * acc.num_processes
        loader = torch.utils.data.DataLoader(order, batch_size=t.batch_size, shuffle=False, drop_last=drop_last,
                                             collate_fn=train_set.batch,
                                             # its own generator: starting an iterator must not draw from the
                                             # global RNG (dropout's), or a resumed run would drift from the original
                                             generator=torch.Generator().manual_seed(t.seed))
        head, optimizer, loader = acc.prepare(head, optimizer, loader)
        acc.register_for_checkpointing(scheduler)
        averaged = weight_average(acc.unwrap_model(head).head, t.ema_decay)
        if averaged is not None:
            acc.register_for_checkpointing(averaged)
        evaluated = head if averaged is None else FeatureHead(averaged.module)  # what dev sees and BEST holds
        documents = data.documents.to(acc.device)
        from retrieval_head.training.losses import DistillationLoss

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
                        inputs = regularize(batch, t.token_dropout, t.feature_dropout, span_dropout=t.span_dropout)
                        student = head(inputs["features"], inputs.get("mask"), inputs.get("span_ids"))
                        total, parts = loss_fn(student, batch["teacher"],
                                               **loss_inputs(recipe.loss, batch, documents, acc))
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
                if averaged is not None:
                    averaged.update_parameters(acc.unwrap_model(head).head)
                state["step"] += 1
                bar.update(1)
                if self.on_step is not None:
                    self.on_step(state["step"], parts)
                if state["step"] % t.log_every == 0 or state["step"] == 1:
                    self._log({"step": state["step"], "epoch": state["epoch"], "lr": scheduler.get_last_lr()[0],
                               **{f"loss/{k}": round(v, 6) for k, v in parts.items()}})
                if state["step"] % t.eval_every == 0 or state["step"] == t.max_steps:
                    last_dev = self._evaluate(evaluated, dev_eval, state)
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

        last = acc.unwrap_model(evaluated).head  # the last weights (their EMA when one is kept)
        test = self._finish(data, key, token_level, state, last) if acc.is_main_process else None
        acc.wait_for_everyone()
        return self._result(state, last_dev, test, probe, started, None)

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
            report = dev_eval.evaluate(lambda f, m, ids: module(*on_device(acc.device, f, m, ids)))
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

    def _finish(self, data: TrainingData, key: str, token_level: bool, state: dict[str, Any],
                last: nn.Module) -> dict[str, Any]:
        """Kept head (last or best) -> test evaluation -> head folder (weights, config with metrics/probe/training,
        card)."""
        from retrieval_head.io.folder import read_weights

        best = self.output_dir / BEST
        if self.recipe.train.keep == "best" and best.is_dir():
            self.model.head.load_state_dict(read_weights(best))
        elif last is not self.model.head:
            self.model.head.load_state_dict(last.state_dict())
        head = self.model.head.float().eval()
        if head.static is not None:  # the shipped table is stored in float16: evaluate what is saved
            with torch.no_grad():
                head.static.weight.copy_(head.static.weight.half().float())
        test_eval = SplitEvaluator(data, "test", key, token_level)
        device = next(head.parameters()).device
        test = test_eval.evaluate(lambda f, m, ids: head.project_features(*on_device(device, f, m, ids)))
        config = self.model.config
        config.metrics = {name: {"head": e["head"], "teacher": e["teacher"], "split": "test",
                                 "queries": e["queries"], "cosine": round(e["cosine"], 4)}
                          for name, e in test.items() if isinstance(e, dict) and "head" in e}
        config.training = training_summary(self.recipe, state, data, str(self.model.dtype).removeprefix("torch."))
        report = {"recipe": self.recipe.name, "kept": self.recipe.train.keep,
                  "kept_step": kept_step(self.recipe, state), "best_step": state["best_step"],
                  "best_dev_score": state["best_score"],
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
                           time.perf_counter() - started, stopped, dict(self.timings), kept_step(self.recipe, state))


def train(recipe: Recipe, output_dir: str | Path, resume: bool = False, **kwargs: Any) -> TrainResult:
    """Run a recipe into `output_dir` (see `Trainer`)."""
    return Trainer(recipe, output_dir, resume=resume, **kwargs).run()


__all__ = ["Trainer", "TrainingStopped", "TrainResult", "train"]
