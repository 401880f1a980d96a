"""Experiment: does the head read the queries the agent LM writes, once it is also distilled on them?

The shipped head learnt to read a dialogue's last *user* message; in the agent path the LM writes a query in
its own (assistant) turn, which the head never saw in training. This script measures that gap and one fix
(dev split only; the test split stays for the report):

1. For DSTC11 dialogues of the train and dev splits, the agent (`NativeRetriever`, default instruction) writes
   its query with `generate()`; one forward over prompt + query then gives the head's weight-free features
   (standardised mean pool at the head's layer; equal to the captured states, see tests/agent) of the query's
   tokens and of the user turn. Kept in `--cache` (a `TensorCache`), with the query texts.
2. A copy of the head is fine-tuned on the train dialogues: alignment + contrastive (`DistillationLoss`) to the
   teacher's embedding of the LM's query text for the query features, and to the teacher's dialogue text for
   the user-turn features (so the conversation mode is kept).
3. On dev: nDCG@10 / R@10 of the head on the LM's query vs the teacher on the same text, and of the head on the
   user turn vs the teacher on the dialogue, before and after.

    .venv/bin/python training/agent_query_distillation.py [--train-dialogues 500] [--steps 600]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

DATASET = "dstc11_track5_val_reviewdoc"


def agent_features(agent: Any, queries: list, cache: Any, split: str, max_new_tokens: int) -> dict[str, Any]:
    """Query-span and user-turn features + query texts for `queries`, computed once and cached."""
    from retrieval_head.io.tensor_cache import cache_key

    model = agent.model
    kind = f"agent-queries-{split}"
    key = cache_key(head=str(model.config.to_dict()), instruction=agent.instruction, ids=[q.id for q in queries],
                    max_new_tokens=max_new_tokens)
    meta: dict[str, Any] = {"dialogues": len(queries)}

    def compute() -> dict[str, torch.Tensor]:
        query_rows, turn_rows, texts = [], [], []
        start = time.perf_counter()
        for i, q in enumerate(queries):
            result = agent.generate_and_search(q.as_messages(), max_new_tokens=max_new_tokens)
            ids = result.prompt_ids + result.generated_ids[: result.span.end]
            mask = torch.zeros(2, len(ids), dtype=torch.long)
            offset = len(result.prompt_ids)
            mask[0, offset + result.span.start : offset + result.span.end] = 1
            user = agent.query_prompt(q.as_messages()).user_span
            mask[1, user[0] : user[1]] = 1
            states = model.layer_states(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
            features = model.head.features(states.expand(2, -1, -1), mask)
            query_rows.append(features[0])
            turn_rows.append(features[1])
            texts.append(result.query_text)
            if (i + 1) % 50 == 0:
                print(f"  {split}: {i + 1}/{len(queries)} dialogues, {time.perf_counter() - start:.0f} s", flush=True)
        meta["texts"] = texts  # written to the entry's meta.json with the tensors
        return {"query": torch.stack(query_rows), "user_turn": torch.stack(turn_rows)}

    with torch.inference_mode():
        tensors = cache.get_or_compute(kind, key, compute, meta=meta)
    texts = json.loads((cache.path(kind, key) / "meta.json").read_text())["texts"]
    return {**{name: t.clone() for name, t in tensors.items()}, "texts": texts}


def evaluate(head: Any, data: dict[str, Any], targets: dict[str, Any], index: Any, queries: list,
             qrels: Any) -> dict[str, Any]:
    from retrieval_head.evaluation import retrieval_metrics

    ids = [q.id for q in queries]

    def scores(vectors: torch.Tensor) -> dict[str, float]:
        _, ranked = index.search(vectors.numpy(), 100)
        m = retrieval_metrics(dict(zip(ids, ranked, strict=True)), qrels)
        return {k: round(m[k], 4) for k in ("ndcg@10", "recall@10")}

    head.eval()
    with torch.no_grad():
        out = {"head_query": scores(head.project_features(data["query"].float())),
               "head_user_turn": scores(head.project_features(data["user_turn"].float())),
               "teacher_query": scores(targets["query"]), "teacher_dialogue": scores(targets["user_turn"])}
    out["retention_query"] = {k: round(out["head_query"][k] / out["teacher_query"][k], 3) for k in out["head_query"]}
    out["retention_user_turn"] = {k: round(out["head_user_turn"][k] / out["teacher_dialogue"][k], 3)
                                  for k in out["head_user_turn"]}
    return out


def fine_tune(head: Any, data: dict[str, Any], targets: dict[str, Any], steps: int, lr: float,
              batch_size: int, seed: int) -> Any:
    from retrieval_head.training.losses import DistillationLoss

    torch.manual_seed(seed)  # dropout
    head = copy.deepcopy(head).train()
    features = torch.cat([data["query"], data["user_turn"]]).float()
    teacher = torch.cat([targets["query"], targets["user_turn"]]).float()
    loss_fn = DistillationLoss({"alignment": 1.0, "contrastive": 0.1})
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randperm(len(features), generator=generator)[:batch_size]
        loss, _ = loss_fn(head.project_features(features[rows]), teacher[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default=str(ROOT / "heads" / "smollm2-135m-minilm"))
    parser.add_argument("--train-dialogues", type=int, default=500, help="Seeded sample of train dialogues.")
    parser.add_argument("--dev-dialogues", type=int, default=None, help="Seeded sample of dev dialogues (smoke runs).")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "features"))
    parser.add_argument("--output", default=str(ROOT / "training" / "results" / "agent_query_distillation.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from common import load_model_and_teacher, repo_relative
    from quality import embedding_cache

    from retrieval_head.agent import NativeRetriever
    from retrieval_head.commands.eval import load_or_build_index
    from retrieval_head.evaluation.compare import check_teacher, split_settings, teacher_texts
    from retrieval_head.retrieval.data import load_dataset_folder

    model, teacher, _ = load_model_and_teacher(args.head)
    fingerprint = check_teacher(model, teacher)
    dataset = load_dataset_folder(ROOT / "data" / DATASET)
    s = split_settings(model)
    splits = dataset.split(dev_fraction=s["dev"], test_fraction=s["test"], seed=s["seed"])
    cache = embedding_cache(args.cache)
    index, _ = load_or_build_index(ROOT / ".cache" / "indexes" / DATASET, teacher, dataset, fingerprint, cache=cache)
    agent = NativeRetriever(model, None)
    train_queries = list(splits.train.queries)
    train_queries = random.Random(0).sample(train_queries, min(args.train_dialogues, len(train_queries)))
    dev_queries = [q for q in splits.dev.queries if q.id in splits.dev.relevant_docs()]
    if args.dev_dialogues:
        dev_queries = random.Random(0).sample(dev_queries, min(args.dev_dialogues, len(dev_queries)))
    data, targets = {}, {}
    for split, queries in (("dev", dev_queries), ("train", train_queries)):
        data[split] = agent_features(agent, queries, cache, split, args.max_new_tokens)
        with torch.inference_mode():
            encoded = {"query": teacher.encode(data[split]["texts"], convert_to_tensor=True),
                       "user_turn": teacher.encode(teacher_texts(queries, teacher)[0], convert_to_tensor=True)}
        targets[split] = {name: t.float().clone() for name, t in encoded.items()}  # usable by autograd
    before = evaluate(model.head, data["dev"], targets["dev"], index, dev_queries, splits.dev.qrels)
    tuned = fine_tune(model.head, data["train"], targets["train"], args.steps, args.lr, args.batch_size, seed=0)
    after = evaluate(tuned, data["dev"], targets["dev"], index, dev_queries, splits.dev.qrels)
    result = {"head": args.head, "train_dialogues": len(train_queries), "dev_dialogues": len(dev_queries),
              "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "instruction": agent.instruction,
              "before": before, "after": after,
              "examples": data["dev"]["texts"][:10]}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(repo_relative(json.dumps(result, indent=2)) + "\n")
    print(json.dumps({"before": before, "after": after}, indent=2))


if __name__ == "__main__":
    main()
