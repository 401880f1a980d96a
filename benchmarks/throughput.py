"""Training throughput: queries/s per epoch with the hidden-state cache vs without.

Both modes train the same head (cosine alignment to the teacher's query embeddings, AdamW) on the same sample of
train-split queries, with the teacher's embeddings computed once beforehand (they are cached in training too):
- without the cache, every step runs the frozen LM over the batch (`retrieval_head.training.features.extract_features`,
  shared-prefix KV reuse included) and then the head (`project_features`);
- with the cache, the LM features are extracted once (timed separately: the one-off cost), then every epoch only
  runs `project_features` over the cached tensors.
Reports seconds and queries/s per epoch for both, the speed-up, and after how many epochs the cache has paid
for itself. Writes benchmarks/results/throughput.{json,md}. Usage:

    .venv/bin/python benchmarks/throughput.py [--head DIR|untrained] [--queries 64] [--epochs 2] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    DATA,
    add_common_arguments,
    describe_machine,
    head_summary,
    load_model_and_teacher,
    machine_info,
    resolve_head,
    set_threads,
    write_results,
)


def sample(data: Path, n: int, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """(LM inputs, queries) of `n` train-split queries of the default split (as training reads them)."""
    from retrieval_head.retrieval.data import load_dataset_folder
    from retrieval_head.training.datasets import lm_input

    train = load_dataset_folder(data).split().train
    queries = random.Random(seed).sample(train.queries, min(n, len(train.queries)))
    return [lm_input(q) for q in queries], queries


def feature_args(model: Any) -> dict[str, Any]:
    """`extract_features` arguments that give exactly the head's input."""
    layer = model.layer_index
    if model.head.token_level:
        return {"layers": [], "poolings": (), "token_layer": layer}
    return {"layers": [layer], "poolings": (model.config.pooling,)}


def head_input(model: Any, features: dict[str, torch.Tensor], rows: list[int]) -> tuple[torch.Tensor, Any]:
    """(features, mask) of `rows` from `extract_features` output: pooled vectors, or padded span tokens."""
    from retrieval_head.training.features import feature_key

    layer = model.layer_index
    if not model.head.token_level:
        return features[feature_key(model.config.pooling, layer)][rows].float(), None
    tokens, offsets = features[f"tokens.L{layer}"], features["token_offsets"]
    pieces = [tokens[offsets[r] : offsets[r + 1]] for r in rows]
    padded = torch.nn.utils.rnn.pad_sequence(pieces, batch_first=True).float()
    mask = torch.zeros(padded.shape[:2], dtype=torch.long)
    for i, p in enumerate(pieces):
        mask[i, : p.shape[0]] = 1
    return padded, mask


def span_ids(features: dict[str, torch.Tensor], rows: list[int]) -> torch.Tensor:
    """The rows' span token ids from `extract_features` output, -1 padded [B, L] (a static branch reads them)."""
    ids, offsets = features["span_ids"], features["span_offsets"]
    pieces = [ids[offsets[r] : offsets[r + 1]].long() for r in rows]
    return torch.nn.utils.rnn.pad_sequence(pieces, batch_first=True, padding_value=-1)


def train_epoch(model: Any, head: Any, optimizer: Any, items: list[Any], targets: torch.Tensor, batch_size: int,
                cached: dict[str, torch.Tensor] | None, seed: int) -> tuple[float, float]:
    """One epoch (shuffled batches); returns (seconds, mean loss). Without `cached`, the LM runs every step."""
    from retrieval_head.training.features import extract_features

    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    head.train()
    losses = []
    start = time.perf_counter()
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        if cached is None:
            features = extract_features(model, [items[r] for r in rows], show_progress_bar=False,
                                        **feature_args(model))
            x, mask = head_input(model, features, list(range(len(rows))))
        else:
            x, mask = head_input(model, cached, rows)
        out = head.project_features(x, mask, span_ids(cached if cached is not None else features,
                                                      rows if cached is not None else list(range(len(rows)))))
        loss = (1 - torch.nn.functional.cosine_similarity(out, targets[rows], dim=-1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return time.perf_counter() - start, sum(losses) / len(losses)


def run_mode(model: Any, items: list[Any], targets: torch.Tensor, args: argparse.Namespace,
             use_cache: bool) -> dict[str, Any]:
    from retrieval_head.training.features import extract_features

    head = copy.deepcopy(model.head)  # both modes start from the same weights
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr)
    out: dict[str, Any] = {"cache": use_cache}
    cached = None
    if use_cache:
        start = time.perf_counter()
        cached = extract_features(model, items, show_progress_bar=False, batch_size=args.batch_size,
                                  **feature_args(model))
        out["cache_build_s"] = time.perf_counter() - start
        out["cache_bytes"] = sum(t.numel() * t.element_size() for t in cached.values())
    epochs = []
    for epoch in range(args.epochs):
        seconds, loss = train_epoch(model, head, optimizer, items, targets, args.batch_size, cached, seed=epoch)
        epochs.append({"seconds": seconds, "queries_per_s": len(items) / seconds, "loss": loss})
    out["epochs"] = epochs
    out["epoch_s"] = sorted(e["seconds"] for e in epochs)[len(epochs) // 2]
    out["queries_per_s"] = len(items) / out["epoch_s"]
    return out


def markdown(result: dict[str, Any]) -> str:
    without, with_ = result["without_cache"], result["with_cache"]
    lines = [
        "## Training throughput",
        "",
        f"Head: {result['head']['description']}; {result['queries']} train-split queries of {result['data']} "
        f"(mean {result['mean_lm_tokens']:.0f} LM tokens each), batch size {result['batch_size']}, "
        f"{result['epochs']} epoch(s) per mode (median epoch shown). Machine: {describe_machine(result['machine'])}.",
        "",
        "| mode | one-off (s) | epoch (s) | queries/s |",
        "|---|---:|---:|---:|",
        f"| without cache (LM forward every step) | — | {without['epoch_s']:.2f} | {without['queries_per_s']:.1f} |",
        f"| with the hidden-state cache | {with_['cache_build_s']:.2f} (extract features) | {with_['epoch_s']:.3f} | "
        f"{with_['queries_per_s']:.0f} |",
        "",
        f"Per epoch the cache is **{result['speedup']:.0f}x** faster; building it costs "
        f"{with_['cache_build_s'] / without['epoch_s']:.2f} uncached epochs (one LM pass per query, larger batches), "
        f"so it has paid for itself by epoch {result['break_even_epochs']} (the paper's best run trained 80 epochs). "
        f"Cache size: {with_['cache_bytes'] / 2**20:.2f} MiB for {result['queries']} queries (fp16).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--data", default=str(DATA / "dstc11_track5_val_reviewdoc"),
                        help="Dataset whose train-split queries are trained on (default: %(default)s).")
    parser.add_argument("--queries", type=int, default=64, help="Queries in the sample (default: %(default)s).")
    parser.add_argument("--epochs", type=int, default=2, help="Epochs per mode (default: %(default)s).")
    parser.add_argument("--batch-size", type=int, default=16, help="Training batch size (default: %(default)s).")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default: %(default)s).")
    args = parser.parse_args()
    set_threads(args.threads)
    spec = resolve_head(args.head)
    model, teacher, description = load_model_and_teacher(spec, args.layer, args.head_type)
    items, queries = sample(Path(args.data), args.queries)
    from retrieval_head.evaluation.compare import teacher_texts

    texts, _ = teacher_texts(queries, teacher)
    targets = torch.as_tensor(teacher.encode(texts, batch_size=64, convert_to_numpy=True), dtype=torch.float32)
    renderer = model.renderer
    tokens = [len(renderer.render(item).input_ids) for item in items]
    without = run_mode(model, items, targets, args, use_cache=False)
    print(f"without cache: {without['queries_per_s']:.2f} queries/s", flush=True)
    with_ = run_mode(model, items, targets, args, use_cache=True)
    print(f"with cache: {with_['queries_per_s']:.1f} queries/s (+{with_['cache_build_s']:.1f} s once)", flush=True)
    # epochs n at which n * uncached >= build + n * cached
    gain = without["epoch_s"] - with_["epoch_s"]
    break_even = int(with_["cache_build_s"] // gain) + 1 if gain > 0 else None
    result = {
        "benchmark": "throughput", "machine": machine_info(), "data": Path(args.data).name,
        "head": {**head_summary(model), "description": description, "spec": spec},
        "queries": len(items), "mean_lm_tokens": sum(tokens) / len(tokens), "batch_size": args.batch_size,
        "epochs": args.epochs, "lr": args.lr, "without_cache": without, "with_cache": with_,
        "speedup": with_["queries_per_s"] / without["queries_per_s"], "break_even_epochs": break_even,
    }
    text = markdown(result)
    write_results(args.name or "throughput", result, text, args.results)
    print(text)


if __name__ == "__main__":
    main()
