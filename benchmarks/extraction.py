"""LM feature extraction and `encode()` on new text: the full pass of before vs the truncated pass, side by side.

*Before* is what the package did until session 6: every decoder block and a vocabulary-sized logit row per
token (`output_hidden_states=True` on the causal LM), for a head that reads one layer. *After* is
`retrieval_head.core.layer_states.hidden_states_at`: the inner model runs up to the deepest layer asked for and
stops, no logits. Both reuse the shared prompt prefix's KV cache and batch texts sorted by length (16 a batch),
so the difference is only what is computed. Also measured: the same extraction under `torch.autocast(bfloat16)`
(tokens/s and the cosine of its pooled features to fp32), and `encode()` on new text at batch 1 and 32.
Rounds visit every path in turn, so a slow stretch of a shared host falls on all of them.
Writes benchmarks/results/extraction.{json,md}. Usage:

    .venv/bin/python benchmarks/extraction.py [--head DIR|untrained] [--texts 96] [--dialogues 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from typing import Any

import torch
from common import (
    DATA,
    add_common_arguments,
    describe_machine,
    head_summary,
    load_model_and_teacher,
    machine_info,
    publish,
    resolve_head,
    set_threads,
)


def sample_inputs(texts: int, dialogues: int, seed: int = 0) -> list[list[Any]]:
    """Two groups, each extracted in its own call as training does per source: corpus sentences of SciFact and
    COVID-QA (they share the chat template's prefix, run once), and DSTC11 dialogues (cut from the left)."""
    from retrieval_head.retrieval.data import load_dataset_folder
    from retrieval_head.training.datasets import corpus_sentences, lm_input

    sentences: list[Any] = []
    for position, name in enumerate(("scifact_train", "covidqa")):
        sentences += corpus_sentences(load_dataset_folder(DATA / name), texts // 2, seed + position)
    dstc = load_dataset_folder(DATA / "dstc11_track5_val_reviewdoc").queries
    return [group for group in (sentences, [lm_input(q) for q in random.Random(seed).sample(dstc, dialogues)])
            if group]


def full_pass_features(model: Any, items: list[Any], batch_size: int = 16) -> torch.Tensor:
    """Before: mean-pooled standardised states of the head's layer (as training caches them) from a full
    causal-LM pass (with logits)."""
    from retrieval_head.core.kv_cache import cache_kwarg
    from retrieval_head.core.pooling import pool
    from retrieval_head.training.features import _shared_prefix

    rendered = [model.renderer.render(item) for item in items]
    prefix, rendered = _shared_prefix(model, rendered)
    order = sorted(range(len(items)), key=lambda i: -len(rendered[i].input_ids))
    out = torch.empty((len(items), model.config.base_hidden_size))
    base = model.base_model
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            rows = order[start : start + batch_size]
            batch = model.renderer.collate([rendered[i] for i in rows])
            mask, kwargs = batch["attention_mask"], {"use_cache": False}
            if prefix is not None:
                cache, length = prefix
                cache = copy.deepcopy(cache)
                cache.batch_repeat_interleave(len(rows))
                mask = torch.cat([torch.ones((len(rows), length), dtype=torch.long), mask], dim=1)
                kwargs = {cache_kwarg(base): cache}
            states = base(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True,
                          **kwargs).hidden_states[model.layer_index]
            standardized = torch.nn.functional.layer_norm(states.float(), (states.shape[-1],))
            out[rows] = pool(standardized, batch["span_mask"], "mean")
    return out


def full_pass_embed(model: Any, items: list[Any]) -> torch.Tensor:
    """Before: `encode()`'s path with a full causal-LM pass (every block, logits)."""
    batch = model.renderer.collate([model.renderer.render(item) for item in items])
    with torch.inference_mode():
        states = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  output_hidden_states=True, use_cache=False).hidden_states[model.layer_index]
        return model.head(states, batch["span_mask"], batch["input_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, several_threads=False)
    parser.add_argument("--texts", type=int, default=96, help="Corpus sentences (half SciFact, half COVID-QA).")
    parser.add_argument("--dialogues", type=int, default=32, help="DSTC11 dialogues (long, conversational).")
    parser.add_argument("--encode-queries", type=int, default=32, help="New texts timed one by one and as a batch.")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds that visit every path in turn.")
    args = parser.parse_args()
    set_threads(args.threads)
    from retrieval_head.core.base import native_bfloat16
    from retrieval_head.training.features import extract_features

    model, _, description = load_model_and_teacher(resolve_head(args.head), layer=24, load_teacher=False)
    model.eval()
    groups = sample_inputs(args.texts, args.dialogues)
    items = [item for group in groups for item in group]
    tokens = sum(len(model.renderer.render(item).input_ids) for item in items)
    layer = model.layer_index

    bf16 = copy.deepcopy(model)  # the base loaded in bfloat16 (`from_pretrained(..., dtype=torch.bfloat16)`)
    bf16.base_model.to(torch.bfloat16)

    def after(on: Any, autocast: str = "float32") -> torch.Tensor:
        return torch.cat([extract_features(on, group, [layer], show_progress_bar=False, autocast=autocast)[
            f"mean.L{layer}"].float() for group in groups])

    extract = {
        "before (full pass, logits)": lambda: torch.cat([full_pass_features(model, group) for group in groups]),
        "after (truncated, no logits)": lambda: after(model),
        "after, bfloat16 autocast": lambda: after(model, "bfloat16"),
        "after, bfloat16 base": lambda: after(bf16),
    }
    queries = sample_inputs(args.encode_queries, 0, seed=1)[0]
    encode = {
        "before (full pass, logits)": lambda qs: full_pass_embed(model, qs),
        "after (truncated, no logits)": lambda qs: model.embed(qs),
        "after, bfloat16 base": lambda qs: bf16.embed(qs),
    }
    seconds: dict[str, list[float]] = {name: [] for name in extract}
    encode_ms: dict[str, dict[str, list[float]]] = {name: {"batch 1": [], "batch 32": []} for name in encode}
    pooled: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name, run in extract.items():
            started = time.perf_counter()
            pooled[name] = run()
            seconds[name].append(time.perf_counter() - started)
        for name, run in encode.items():
            with torch.inference_mode():
                for q in queries:
                    started = time.perf_counter()
                    run([q])
                    encode_ms[name]["batch 1"].append(1000 * (time.perf_counter() - started))
                started = time.perf_counter()
                run(queries[:32])
                encode_ms[name]["batch 32"].append(1000 * (time.perf_counter() - started))
    reference = pooled["before (full pass, logits)"]
    extraction = {}
    for name, runs in seconds.items():
        best = min(runs)
        cosine = torch.nn.functional.cosine_similarity(pooled[name], reference)
        extraction[name] = {"seconds": runs, "tokens_per_s": round(tokens / best, 1),
                            "cosine_to_before_min": round(float(cosine.min()), 6),
                            "cosine_to_before_mean": round(float(cosine.mean()), 6)}
    before = extraction["before (full pass, logits)"]["tokens_per_s"]
    for row in extraction.values():
        row["speedup"] = round(row["tokens_per_s"] / before, 2)
    encode_rows = {name: {size: round(statistics.median(v), 2) for size, v in sizes.items()}
                   for name, sizes in encode_ms.items()}
    result = {
        "head": description, "head_summary": head_summary(model), "machine": machine_info(),
        "texts": len(items), "tokens": tokens, "layer": layer, "rounds": args.rounds,
        "extraction": extraction, "encode_ms": encode_rows,
        "encode_speedup": {name: {size: round(encode_rows["before (full pass, logits)"][size] / row[size], 2)
                                  for size in ("batch 1", "batch 32")}
                           for name, row in encode_rows.items() if name.startswith("after")},
        "cpu_bfloat16": native_bfloat16(),
    }
    publish(args.name or "extraction", result, markdown, None, args.results)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# LM feature extraction and encode() on new text: full pass (before) vs truncated pass (after)", "",
        f"Machine: {describe_machine(result['machine'])}.",
        f"Head: {result['head']} (reads layer {result['layer']}). {result['texts']} texts, {result['tokens']} tokens "
        "(corpus sentences + DSTC11 dialogues, chat template, each group in one call as training extracts a "
        f"source: the shared prefix runs once); tokens/s counts every rendered token; best of {result['rounds']} "
        "rounds.", "",
        "| extraction | tokens/s | speed-up | cosine of pooled features to before (min / mean) |",
        "|---|---:|---:|---|",
    ]
    for name, row in result["extraction"].items():
        lines.append(f"| {name} | {row['tokens_per_s']:.0f} | {row['speedup']:.2f}x | "
                     f"{row['cosine_to_before_min']:.6f} / {row['cosine_to_before_mean']:.6f} |")
    lines += ["", "| encode() on new text | batch 1 (ms, median) | batch 32 (ms, median) |", "|---|---:|---:|"]
    for name, row in result["encode_ms"].items():
        lines.append(f"| {name} | {row['batch 1']:.1f} | {row['batch 32']:.1f} |")
    for name, speed in result["encode_speedup"].items():
        lines.append(f"\nencode() speed-up, {name}: {speed['batch 1']:.2f}x at batch 1, "
                     f"{speed['batch 32']:.2f}x at batch 32.")
    lines += ["", f"Native bfloat16 on this CPU (what `base.dtype: auto` reads): {result['cpu_bfloat16']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
