"""Which head input keeps most of the teacher: one mean-pooled layer, several layers, a lexical (static) branch.

Reads the default recipe's caches (fill them with `retrieval-head cache --recipe ...`), trains each variant with
the recipe's losses, learning rate and batch size for `--steps` steps, and prints dev nDCG@10 retention per
dataset (the test split is not touched). Variants:

- `L24`: the shipped input, layer 24 mean-pooled (an MLP, as the default head);
- `L24+L0`: layers 24 and 0 (the input embeddings: a bag of the LM's own token vectors) concatenated;
- `L24+staticN`: layer 24's MLP plus a learned table over the span's LM token ids, the mean of the rows of the
  span's tokens (N dims, then a linear map to the teacher's; no N = the teacher's dim, no map) added before
  normalising (the static branch of the retention-floor issue).

    .venv/bin/python training/head_input_experiments.py [--steps 6000] [--variants L24,L24+L0,L24+static]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.nn import functional as F

from retrieval_head.fingerprint import TeacherFingerprint
from retrieval_head.losses import DistillationLoss
from retrieval_head.model import get_retrieval_model
from retrieval_head.training.datasets import ExampleSet, TrainingData, build_training_data
from retrieval_head.training.evaluation import SplitEvaluator
from retrieval_head.training.recipe import Recipe
from retrieval_head.training.trainer import head_config, load_models, recipe_cache


class Variant(nn.Module):
    """MLP over concatenated pooled layers, plus an optional static table over span token ids."""

    def __init__(self, in_dim: int, out_dim: int, inner: int, vocab: int | None, static_dim: int = 0,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, out_dim))
        self.table = nn.EmbeddingBag(vocab, static_dim, mode="mean") if static_dim else None
        self.up = nn.Linear(static_dim, out_dim, bias=False) if static_dim and static_dim != out_dim else None
        if self.table is not None:
            if self.up is None:
                nn.init.zeros_(self.table.weight)
            else:
                nn.init.normal_(self.table.weight, std=0.02)
                nn.init.zeros_(self.up.weight)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.mlp(features[:, : self.in_dim])
        if self.table is not None:
            static = _bag(self.table, features[:, self.in_dim :].long())
            out = out + (static if self.up is None else self.up(static))
        return F.normalize(out, dim=-1)


def _bag(table: nn.EmbeddingBag, ids: torch.Tensor) -> torch.Tensor:
    """Mean of the table rows of each row's ids (-1 = padding)."""
    valid = ids >= 0
    flat = ids[valid]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), valid.sum(1).cumsum(0)[:-1]])
    return table(flat, offsets)


def example_set(data: TrainingData, split: str, keys: list[str], with_ids: bool, width: int) -> ExampleSet:
    """The split's rows with features = the keys' pooled vectors concatenated (+ span ids as float columns)."""
    parts = []
    for source in data.sources:
        rows = source.splits.get(split)
        if not rows:
            continue
        base = ExampleSet.from_source(source, rows, keys[0], False)
        columns = [source.features[k][rows].float() for k in keys]
        if with_ids:
            ids = torch.full((len(rows), width), -1.0)
            offsets, span_ids = source.features["span_offsets"], source.features["span_ids"]
            for r, i in enumerate(rows):
                piece = span_ids[offsets[i] : offsets[i + 1]][:width]
                ids[r, : len(piece)] = piece.float()
            columns.append(ids)
        base.features = torch.cat(columns, dim=1)
        parts.append(base)
    return ExampleSet.concat(parts)


def patched_evaluator(data: TrainingData, split: str, keys: list[str], with_ids: bool, width: int) -> SplitEvaluator:
    evaluator = SplitEvaluator(data, split, keys[0])
    for part in evaluator.parts:
        rows = part.source.splits[split]
        columns = [part.source.features[k][rows].float() for k in keys]
        if with_ids:
            ids = torch.full((len(rows), width), -1.0)
            offsets, span_ids = part.source.features["span_offsets"], part.source.features["span_ids"]
            for r, i in enumerate(rows):
                piece = span_ids[offsets[i] : offsets[i + 1]][:width]
                ids[r, : len(piece)] = piece.float()
            columns.append(ids)
        part.examples.features = torch.cat(columns, dim=1)
    return evaluator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="training/recipes/smollm2-135m-minilm.yaml")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--variants", default="L24,L24+L0,L24+static")
    parser.add_argument("--corpus-texts", type=int, default=None, help="Use only the first N corpus texts per dataset.")
    parser.add_argument("--inner", type=int, default=1024)
    parser.add_argument("--out", default=None, help="Append JSON lines of results here.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    recipe = Recipe.load(args.recipe)
    if args.corpus_texts is not None:
        recipe = recipe.replace(**{"data.corpus_texts": args.corpus_texts})
    base, tokenizer, teacher = load_models(recipe)
    fingerprint = TeacherFingerprint.from_sentence_transformer(teacher, teacher_id=recipe.teacher.model)
    model = get_retrieval_model(base, head_config(recipe, fingerprint), tokenizer)
    data = build_training_data(recipe, model, teacher, fingerprint, recipe_cache(recipe), show_progress_bar=False)
    vocab = int(base.config.vocab_size)
    lo, t = recipe.loss, recipe.train
    for name in args.variants.split(","):
        keys = ["mean.L24"] + (["mean.L0"] if "L0" in name else [])
        with_ids, width = "static" in name, 64
        static_dim = int(name.split("static")[1] or fingerprint.dim) if with_ids else 0
        train = example_set(data, "train", keys, with_ids, width)
        dev = patched_evaluator(data, "dev", keys, with_ids, width)
        torch.manual_seed(t.seed)
        head = Variant(576 * len(keys), fingerprint.dim, args.inner, vocab, static_dim)
        optimizer = torch.optim.AdamW(head.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        from transformers import get_cosine_schedule_with_warmup

        schedule = get_cosine_schedule_with_warmup(optimizer, int(t.warmup_ratio * args.steps), args.steps)
        loss_fn = DistillationLoss({"alignment": lo.alignment, "contrastive": lo.contrastive, "rank": lo.rank},
                                   lo.alignment_kind, lo.contrastive_temperature, lo.rank_temperature, lo.top_k)
        documents = data.documents
        generator = torch.Generator().manual_seed(t.seed)
        started, best = time.time(), None
        order = torch.randperm(len(train), generator=generator)
        position = 0
        for step in range(1, args.steps + 1):
            if position + t.batch_size > len(order):
                order, position = torch.randperm(len(train), generator=generator), 0
            rows = order[position : position + t.batch_size].tolist()
            position += t.batch_size
            batch = train.batch(rows)
            head.train()
            student = head(batch["features"])
            loss, _ = loss_fn(student, batch["teacher"], rank_documents=documents, top_k_indices=batch["top_k"])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(head.parameters(), t.max_grad_norm)
            optimizer.step()
            schedule.step()
            if step % 1000 == 0 or step == args.steps:
                head.eval()
                report = dev.evaluate(lambda f, m, head=head: head(f))
                row = {n: round(v["retention"]["ndcg@10"], 3) for n, v in report.items() if n != "mean_retention"}
                mean = round(report["mean_retention"]["ndcg@10"], 3)
                best = max(best or 0, mean)
                print(json.dumps({"variant": name, "step": step, "mean": mean, **row,
                                  "seconds": round(time.time() - started)}), flush=True)
        result = {"variant": name, "steps": args.steps, "train_examples": len(train), "last_mean": mean,
                  "best_mean": best, "corpus_texts": recipe.data.corpus_texts, **row}
        print("RESULT", json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
