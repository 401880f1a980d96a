"""Retention with vs without an encode adapter (LoRA trained with the head), on a small held-out SciFact sample.

All arms start from the same seeded fresh head (recipe defaults: layer 20, mean pooling, MLP 1024, chat template)
on the embedded SmolLM2-135M-Instruct, distilled from the embedded all-MiniLM-L6-v2 with the same loss (alignment
1.0 + label-free contrastive 0.1) and the same head learning rate:

- `head-warm`: head only, `--warm-steps` steps on features of the frozen base computed once (the cheap path);
- `+head`: from `head-warm`, `--steps` more head-only steps;
- `+head+lora`: from `head-warm`, `--steps` steps of head + a fresh encode adapter jointly (same batches), the LM
  run forward and backward every step. `+head+lora` vs `+head` is the adapter's effect.

Train queries come from SciFact's train split, test queries from its test split (dev 0.1 / test 0.2, seed 0, as
the recipe splits); the index is the teacher's embeddings of the whole corpus (read from the feature cache when
there). Small on purpose (CPU, 1 thread): read the numbers as a smoke test of the trade-off, not a verdict.

    python benchmarks/encode_adapter.py --train 200 --test 100 --warm-steps 3000 --steps 75
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, ROOT, describe_machine, machine_info, write_results  # noqa: E402

METRICS = ("ndcg@10", "recall@10", "mrr@10")


def fresh_model(fingerprint: Any, layer: int, seed: int) -> Any:
    from retrieval_head import RetrievalHeadConfig, get_retrieval_model
    from retrieval_head.io.embedded import BASE_ID, load_embedded_base

    base, tokenizer = load_embedded_base()
    config = RetrievalHeadConfig(base_model_name_or_path=BASE_ID, layer=layer, output_dim=fingerprint.dim,
                                 teacher=fingerprint.to_dict(), max_length=256, seed=seed)
    return get_retrieval_model(base, config, tokenizer=tokenizer).eval()


@torch.no_grad()
def frozen_features(model: Any, items: list[Any], batch_size: int = 16) -> torch.Tensor:
    """The head's weight-free input (standardised, pooled states of the frozen base), as the trainer caches."""
    renderer, rows = model.renderer, []
    prompt = (model.config.prompts or {}).get("query", "")
    for start in range(0, len(items), batch_size):
        batch = renderer.collate([renderer.render(i, prompt) for i in items[start:start + batch_size]],
                                 device=model.device)
        states = model.layer_states(batch["input_ids"], batch["attention_mask"])
        rows.append(model.head.features(states, batch["span_mask"]))
    return torch.cat(rows)


def train_head_only(model: Any, features: torch.Tensor, targets: torch.Tensor, steps: int, batch_size: int,
                    lr: float, seed: int) -> float:
    """The `train_encode_adapter` loop without the LoRA (same loss, optimizer, schedule, batch order)."""
    from transformers import get_cosine_schedule_with_warmup

    from retrieval_head.training.losses import DistillationLoss

    loss_fn = DistillationLoss({"alignment": 1.0, "contrastive": 0.1, "rank": 0.0})
    torch.manual_seed(seed)
    params = list(model.head.parameters())
    optimizer = torch.optim.AdamW([{"params": params, "lr": lr}], weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(0.05 * steps), steps)
    generator, order = torch.Generator().manual_seed(seed), []
    take = min(batch_size, len(features))
    started = time.perf_counter()
    model.train(True)
    for _ in range(steps):
        if len(order) < take:
            order += torch.randperm(len(features), generator=generator).tolist()
        rows, order = order[:take], order[take:]
        loss, _ = loss_fn(model.head.project_features(features[rows]), targets[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
    model.train(False)
    return time.perf_counter() - started


def evaluate(model: Any, teacher: Any, test: Any, index: Any, fingerprint: Any) -> dict[str, Any]:
    from retrieval_head.evaluation.compare import compare_head_and_teacher

    start = time.perf_counter()
    report = compare_head_and_teacher(model, teacher, test, index=index, fingerprint=fingerprint, bm25=False,
                                      worst=0, batch_size=16)
    return {"head": {m: report["metrics"]["head"][m] for m in METRICS},
            "teacher": {m: report["metrics"]["teacher"][m] for m in METRICS},
            "retention": {m: report["retention"][m] for m in METRICS if m in report["retention"]},
            "top10_overlap_mean": report["agreement"]["top10_overlap_mean"],
            "eval_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="scifact_train")
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--steps", type=int, default=75)
    parser.add_argument("--warm-steps", type=int, default=3000, help="head-only steps before the two arms")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="head learning rate (all arms)")
    parser.add_argument("--adapter-lr", type=float, default=5e-4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "features"))
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from retrieval_head.io.embedded import load_teacher
    from retrieval_head.io.tensor_cache import TensorCache
    from retrieval_head.retrieval.data import load_dataset_folder
    from retrieval_head.retrieval.fingerprint import TeacherFingerprint
    from retrieval_head.retrieval.index import DocumentIndex
    from retrieval_head.retrieval.teacher import teacher_embeddings, teacher_max_tokens, teacher_query_text
    from retrieval_head.training.adapter_distillation import train_encode_adapter
    from retrieval_head.training.datasets import lm_input

    started = time.perf_counter()
    info = machine_info()
    teacher = load_teacher()
    fingerprint = TeacherFingerprint.from_sentence_transformer(teacher)
    dataset = load_dataset_folder(DATA / args.dataset)
    split = dataset.split(0.1, 0.2, seed=0)
    train_pool, test_pool = list(split.train.queries), list(split.test.queries)
    train_queries = random.Random(args.seed).sample(train_pool, min(args.train, len(train_pool)))
    test_ids = [q.id for q in random.Random(args.seed + 17).sample(test_pool, min(args.test, len(test_pool)))]
    test = dataset.subset(test_ids, name=f"{dataset.name}:test{len(test_ids)}")
    docs = teacher_embeddings(teacher, dataset.document_texts(), TensorCache(args.cache), fingerprint, "document",
                              show_progress_bar=False)
    index = DocumentIndex.from_embeddings(docs.numpy(), dataset.doc_ids, fingerprint)
    max_tokens = teacher_max_tokens(teacher)
    items = [lm_input(q) for q in train_queries]
    targets = teacher_embeddings(teacher, [teacher_query_text(q, teacher.tokenizer, max_tokens)
                                           for q in train_queries], None, fingerprint, show_progress_bar=False)
    setup_s = time.perf_counter() - started

    arms: dict[str, Any] = {}
    model = fresh_model(fingerprint, args.layer, args.seed)
    arms["untrained"] = evaluate(model, teacher, test, index, fingerprint)
    start = time.perf_counter()
    features = frozen_features(model, items)
    features_s = time.perf_counter() - start
    warm_s = train_head_only(model, features, targets, args.warm_steps, args.batch_size, args.lr, args.seed)
    arms["head-warm"] = {"steps": args.warm_steps, "train_s": round(features_s + warm_s, 1),
                         "train_detail": f"LM features once {features_s:.1f}s + head steps {warm_s:.1f}s",
                         **evaluate(model, teacher, test, index, fingerprint)}
    warm = {k: v.clone() for k, v in model.head.state_dict().items()}
    more_s = train_head_only(model, features, targets, args.steps, args.batch_size, args.lr, args.seed + 1)
    arms["+head"] = {"steps": args.steps, "train_s": round(more_s, 1), "train_detail": "head steps on cached features",
                     **evaluate(model, teacher, test, index, fingerprint)}
    model.head.load_state_dict(warm)
    result = train_encode_adapter(model, items, targets, r=args.r, alpha=args.alpha, lr=args.lr,
                                  adapter_lr=args.adapter_lr, batch_size=args.batch_size, max_steps=args.steps,
                                  seed=args.seed + 1, log_every=max(1, args.steps // 4))
    arms["+head+lora"] = {"steps": args.steps, "train_s": round(result.seconds, 1),
                          "train_detail": f"LM forward+backward every step ({result.seconds / args.steps:.1f}s/step)",
                          "encode_adapter": {k: v for k, v in result.encode_adapter.items() if k != "checksum"},
                          "log": result.log, **evaluate(model, teacher, test, index, fingerprint)}

    data = {
        "benchmark": "encode_adapter", "machine": info, "dataset": args.dataset,
        "train_queries": len(train_queries), "test_queries": len(test_ids),
        "settings": {k: v for k, v in vars(args).items() if k not in ("results", "cache")},
        "arms": arms, "setup_s": round(setup_s, 1), "total_s": round(time.perf_counter() - started, 1),
    }
    write_results("encode_adapter", data, markdown(data), args.results)
    print(markdown(data))


def markdown(data: dict[str, Any]) -> str:
    s, arms = data["settings"], data["arms"]
    teacher = arms["head-warm"]["teacher"]
    delta = arms["+head+lora"]["retention"]["ndcg@10"] - arms["+head"]["retention"]["ndcg@10"]
    lines = [
        "# Encode adapter: retention with vs without a LoRA trained with the head",
        "",
        f"SmolLM2-135M-Instruct -> all-MiniLM-L6-v2, {data['dataset']}: {data['train_queries']} train queries "
        f"(train split), {data['test_queries']} held-out test queries (test split; dev 0.1 / test 0.2, seed 0), "
        f"index = teacher embeddings of the whole corpus. Fresh MLP head at layer {s['layer']} (seed {s['seed']}), "
        f"batch {s['batch_size']}, head lr {s['lr']}, LoRA r={s['r']} alpha={s['alpha']} lr {s['adapter_lr']} "
        "(PEFT's default targets: q_proj, v_proj), loss alignment 1.0 + contrastive 0.1.",
        "",
        f"Machine: {describe_machine(data['machine'])}. Produced by `python benchmarks/encode_adapter.py` "
        f"({data['total_s']:.0f} s in all).",
        "",
        f"Teacher on these {data['test_queries']} queries: "
        + ", ".join(f"{m} {teacher[m]:.3f}" for m in METRICS) + ".",
        "",
        "| arm | steps | training (s) | nDCG@10 | retention nDCG@10 | recall@10 | retention recall@10 "
        "| top-10 overlap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("untrained", "head-warm", "+head", "+head+lora"):
        a = arms[name]
        lines.append(
            f"| {name} | {a.get('steps', 0)} | {a.get('train_s', 0)} | {a['head']['ndcg@10']:.3f} | "
            f"{a['retention'].get('ndcg@10', float('nan')):.1%} | {a['head']['recall@10']:.3f} | "
            f"{a['retention'].get('recall@10', float('nan')):.1%} | {a['top10_overlap_mean']:.2f} |")
    lines += [
        "",
        f"- `head-warm`: a head trained alone for {s['warm_steps']} steps on features of the frozen base computed "
        "once (the cheap path, as the cached trainer does). From it, the same number of further steps (same "
        "batches, loss, head lr): `+head` = head only; `+head+lora` = head and a fresh encode adapter jointly, "
        "the LM run forward and backward every step. The difference between these two is the adapter's effect.",
        "- Cost of the adapter at inference: generation runs with it off (output identical to the base's), so "
        "the agent cannot reuse generation's states for the query: one extra LM pass with the adapter on per "
        "query (`NativeRetriever` refuses such a model).",
        f"- Adapter effect here: {100 * delta:+.1f} points of nDCG@10 retention (`+head+lora` minus `+head`). With "
        f"{data['train_queries']} train queries every arm stays far below the teacher (the head is data-starved), "
        "so this sample cannot say whether the adapter helps: inconclusive.",
        f"- Sample size: {data['test_queries']} test queries; a difference of a few points of nDCG@10 is within "
        "the noise of this sample (one seed). This is a smoke test of the trade-off, not a verdict; rerun on "
        "a GPU with more train queries and steps before choosing the adapter.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
