"""Query-embedding latency, three ways, at batch 1 and batch 32, all in one process.

(a) teacher `encode` on the query text (the two-model pipeline: tokenizer + MiniLM forward);
(b) `RetrievalModel.encode_query` on the same text: chat template + tokenizer + LM forward + head - what
    embedding NEW text costs (also shown: the LM forward on pre-tokenized input + head, without the tokenizer);
(c) the head alone on hidden states that already exist (the agent case: generation computed them): one call of
    `model.head(states, span_mask)` on the columns of the query's own tokens (what `NativeRetriever` passes)
    under `torch.inference_mode()`, no tokenizer, no Python loop; with fp32 weights (as trained), and with the
    same head quantized to float16 and to int8 weights (`model.quantize_head`, CPU only; their retrieval quality
    is measured side by side by `benchmarks/quantization.py`); `--also-head DIR` times (c) for more heads in the
    same process (e.g. a smaller, faster head), each on the states of its own layer.

Reports (a)/(c) for each (the agent-path speed-up; target >= 60x at batch 1) and (a)/(b) (< 1: new text pays an
LM pass).
Each timing is the median of `--runs` runs after `--warmup` runs, spread over `--rounds` rounds that visit every
path in turn (a slow stretch of a shared host hits all paths alike); runs cycle through real query texts (the
questions of `--data`). Speed does not depend on training, so an untrained head measures the same as a trained
one of the same type and layer. Writes benchmarks/results/latency.{json,md,png}. Usage:

    .venv/bin/python benchmarks/latency.py [--head DIR|untrained] [--also-head DIR ...] [--runs 60] [--warmup 5]
        [--rounds 6] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import (
    DATA,
    add_common_arguments,
    describe_machine,
    fmt,
    head_summary,
    load_model_and_teacher,
    machine_info,
    publish,
    pyplot,
    resolve_head,
    set_threads,
    summarize,
)

PATHS = {
    "teacher": "(a) teacher `encode` (query text)",
    "lm_head": "(b) LM forward + head (`encode_query`, tokenizer included)",
    "lm_forward_head": "(b') LM forward + head on pre-tokenized input",
    "head": "(c) head alone on existing hidden states, fp32 weights",
    "head_float16": "(c) same, float16 weights",
    "head_int8": "(c) same, int8 weights",
}
TARGET_SPEEDUP = 60  # (a)/(c) at batch 1: the head on existing states vs the teacher
HEAD_PATHS = {"head": None, "head_float16": "float16", "head_int8": "int8"}  # path -> quantize_head(...)


def speedup_key(dtype: str | None) -> str:
    """Result key of (a)/(c) for the head with `dtype` weights (None: fp32)."""
    return "speedup_a_over_c" + (f"_{dtype}" if dtype else "")


SPEEDUPS = {speedup_key(dtype): dtype or "fp32" for dtype in HEAD_PATHS.values()}  # result key -> label


def time_interleaved(fns: dict[str, Callable[[int], Any]], runs: int, warmup: int,
                     rounds: int) -> dict[str, list[float]]:
    """Seconds of `runs` timed calls `fn(i)` of every path, taken in `rounds` rounds that visit each path in turn.

    A slow stretch of a shared host then slows every path alike instead of one, so the ratios hold. Each visit
    opens with untimed calls (`warmup` on the first visit, two on later ones): a path is timed warm, as it runs
    when called again and again.
    """
    times: dict[str, list[float]] = {key: [] for key in fns}
    i = 0
    for r in range(rounds):
        count = runs // rounds + (r < runs % rounds)
        for key, fn in fns.items():
            for _ in range(warmup if r == 0 else min(2, warmup)):
                fn(i)
            for _ in range(count):
                start = time.perf_counter()
                fn(i)
                times[key].append(time.perf_counter() - start)
                i += 1
    return times


def query_texts(data: Path, n: int) -> list[str]:
    from retrieval_head.retrieval.data import load_dataset_folder

    texts = [q.text for q in load_dataset_folder(data).queries]
    return texts[:n]


def span_columns(mask: torch.Tensor) -> tuple[int, int]:
    """First and one-past-last column where any row's span mask is set."""
    used = mask.any(dim=0).nonzero().flatten()
    return int(used[0]), int(used[-1]) + 1


def model_inputs(model: Any, batches: list[list[str]]) -> list[dict[str, torch.Tensor]]:
    """The LM inputs of each batch, as `model` renders them (template, span mask)."""
    renderer = model.renderer
    return [renderer.collate([renderer.render(t) for t in b], device=model.device) for b in batches]


def head_paths(model: Any, inputs: list[dict[str, torch.Tensor]]) -> tuple[dict[str, Callable[[int], Any]], float]:
    """(c) with every weight precision in HEAD_PATHS (a copy of the head each), on the states of the head's layer
    cut to the spans' columns, as the agent passes them; and the mean span length."""
    with torch.inference_mode():
        states = [model.layer_states(x["input_ids"], x["attention_mask"]) for x in inputs]
    masks = [x["span_mask"] for x in inputs]
    columns = [span_columns(m) for m in masks]
    states = [s[:, lo:hi].contiguous() for s, (lo, hi) in zip(states, columns, strict=True)]
    ids = [x["input_ids"][:, lo:hi] if model.head.uses_ids else None
           for x, (lo, hi) in zip(inputs, columns, strict=True)]  # a static branch reads the span's ids too
    masks = [m[:, lo:hi] for m, (lo, hi) in zip(masks, columns, strict=True)]
    n, fns = len(inputs), {}
    for key, dtype in HEAD_PATHS.items():
        head = copy.deepcopy(model.head).eval().quantize(dtype)

        def run_head(i: int, head: Any = head) -> None:
            with torch.inference_mode():
                head(states[i % n], masks[i % n], ids[i % n])

        fns[key] = run_head
    return fns, float(torch.cat([m.sum(1) for m in masks]).float().mean())


def measure(model: Any, teacher: Any, texts: list[str], batch: int, runs: int, warmup: int, rounds: int,
            also: dict[str, Any] | None = None) -> dict[str, Any]:
    """Timings of every path at one batch size (and (c) of the `also` heads); batches cycle through `texts`."""
    batches = [texts[i : i + batch] for i in range(0, len(texts) - batch + 1, batch)] or [texts[:batch]]
    inputs = model_inputs(model, batches)
    head = model.head.eval()
    n = len(batches)

    def run_teacher(i: int) -> None:
        teacher.encode(batches[i % n], batch_size=batch, convert_to_numpy=True)

    def run_lm_head(i: int) -> None:
        model.encode_query(batches[i % n], batch_size=batch, convert_to_numpy=True)

    def run_lm_forward_head(i: int) -> None:
        x = inputs[i % n]
        with torch.inference_mode():
            head(model.layer_states(x["input_ids"], x["attention_mask"]), x["span_mask"], x["input_ids"])

    fns: dict[str, Callable[[int], Any]] = {"teacher": run_teacher, "lm_head": run_lm_head,
                                            "lm_forward_head": run_lm_forward_head}
    head_fns, span_tokens = head_paths(model, inputs)
    fns.update(head_fns)
    for spec, other in (also or {}).items():
        fns.update({f"{spec}|{key}": fn for key, fn in head_paths(other, model_inputs(other, batches))[0].items()})
    times = time_interleaved(fns, runs, warmup, rounds)
    out: dict[str, Any] = {"batch_size": batch, "threads": torch.get_num_threads(), "distinct_batches": n,
                           "mean_tokens": float(torch.cat([x["attention_mask"].sum(1) for x in inputs]).float().mean()),
                           "mean_span_tokens": span_tokens, "also_heads": {spec: {} for spec in also or {}}}
    for key, seconds in times.items():
        spec, _, path = key.rpartition("|")
        (out["also_heads"][spec] if spec else out)[path] = summarize(seconds)
    a = out["teacher"]["median_ms"]
    for timings in (out, *out["also_heads"].values()):
        for key, dtype in HEAD_PATHS.items():
            timings[speedup_key(dtype)] = a / timings[key]["median_ms"]
    out["speedup_a_over_b"] = a / out["lm_head"]["median_ms"]
    return out


Timings = Callable[[dict[str, Any]], dict[str, Any]]  # a batch result -> one head's (c) timings and speed-ups


def timed_heads(result: dict[str, Any]) -> list[tuple[dict[str, Any], Timings]]:
    """(summary, timings) of the benchmark's head, then of each `--also-head` head."""
    return [(result["head"], lambda r: r)] + [(info, lambda r, spec=spec: r["also_heads"][spec])
                                               for spec, info in result.get("also_heads", {}).items()]


def head_rows(result: dict[str, Any]) -> list[tuple[str, str, Timings]]:
    """(label, plot tick, batch result -> its timings) of the (c) rows of the `--also-head` heads."""
    return [(f"(c) {info['description']}, {dtype or 'fp32'} weights", f"(c) {info['head_type']}\n{dtype or 'fp32'}",
             lambda r, timings=timings, key=key: timings(r)[key])
            for info, timings in timed_heads(result)[1:] for key, dtype in HEAD_PATHS.items()]


def markdown(result: dict[str, Any]) -> str:
    also = head_rows(result)
    lines = [
        "## Query latency",
        "",
        f"Head: {result['head']['description']}; teacher {result['head']['teacher']}. Median of "
        f"{result['runs']} runs after {result['warmup']} warm-up runs, one process"
        + (f", in {result['rounds']} rounds that visit every path in turn" if result.get("rounds") else "")
        + f". Machine: "
        f"{describe_machine(result['machine'])}.",
        "",
        "| path | " + " | ".join(f"batch {r['batch_size']}, {r['threads']} thr. (ms)" for r in result["batches"])
        + " |",
        "|---|" + "---:|" * len(result["batches"]),
    ]
    for key, label in PATHS.items():
        lines.append(f"| {label} | " + " | ".join(fmt(r[key]["median_ms"]) for r in result["batches"]) + " |")
    for label, _, timings in also:
        lines.append(f"| {label} | " + " | ".join(fmt(timings(r)["median_ms"]) for r in result["batches"]) + " |")
    heads = timed_heads(result)
    for i, (info, timings) in enumerate(heads):
        name = "head on existing states" if i == 0 else info["description"]
        for key, label in SPEEDUPS.items():
            lines.append(f"| **(a)/(c)**: {name} vs teacher, {label} weights | "
                         + " | ".join(f"**{timings(r)[key]:.1f}x**" for r in result["batches"]) + " |")
    lines.append("| (a)/(b): `encode()` on new text vs teacher | "
                 + " | ".join(f"{r['speedup_a_over_b']:.2f}x" for r in result["batches"]) + " |")
    first = result["batches"][0]
    ones = [r for r in result["batches"] if r["batch_size"] == 1]
    target = "; ".join(f"{info['head_type']} head, {label} weights {timings(r)[key]:.1f}x with {r['threads']} "
                       f"thread(s) ({'met' if timings(r)[key] >= TARGET_SPEEDUP else 'not met'})"
                       for r in ones for info, timings in heads for key, label in SPEEDUPS.items())
    lines += [
        "",
        f"Query tokens as the LM reads them (chat template included): {first['mean_tokens']:.1f} on average, "
        f"{first['mean_span_tokens']:.1f} of them the question. Each column is one torch thread setting for every "
        "path. `encode()` on new text pays an LM forward pass and is slower than the teacher; the win is the agent "
        "path, where generation already computed the states and only the head runs."
        + (f" Target (a)/(c) >= {TARGET_SPEEDUP}x at batch 1: {target}." if ones else ""),
    ]
    if "quantize_to" in result["head"]:
        default = result["head"]["quantize_to"] or "fp32"
        lines += ["", f"The head loads with **{default}** weights by default (its config's `quantize_to`, applied on "
                      "the CPU by `from_pretrained`): that row is what a user's agent runs; `quantize_head_to=None` "
                      "gives the fp32 row."]
    if result.get("plot"):
        lines += ["", f"![query latency]({result['plot']})"]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    keys, also = list(PATHS), head_rows(result)
    fig, ax = plt.subplots(figsize=(8.5 + 1.2 * len(also), 3.8))
    width = 0.8 / len(result["batches"])
    for j, r in enumerate(result["batches"]):
        values = [r[k]["median_ms"] for k in keys] + [timings(r)["median_ms"] for _, _, timings in also]
        xs = [i + (j - (len(result["batches"]) - 1) / 2) * width for i in range(len(values))]
        bars = ax.bar(xs, values, width, label=f"batch {r['batch_size']}, {r['threads']} thread(s)")
        ax.bar_label(bars, labels=[f"{v:.2f}" if v < 10 else f"{v:.0f}" for v in values], fontsize=7)
    ax.set_yscale("log")
    ticks = ["(a) teacher\nencode", "(b) LM + head\nencode_query", "(b') LM fwd\n+ head",
             "(c) head on\nexisting states", "(c) float16\nweights", "(c) int8\nweights"]
    ax.set_xticks(range(len(ticks) + len(also)), ticks + [tick for _, tick, _ in also], fontsize=8)
    ax.set_ylabel("ms per batch (median, log scale)")
    ax.set_title("Query embedding latency", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, several_threads=True)
    parser.add_argument("--data", default=str(DATA / "scifact_train"),
                        help="Dataset whose query texts are embedded (default: %(default)s).")
    parser.add_argument("--runs", type=int, default=60, help="Timed runs per path and batch size (>= 50 for "
                                                             "reported numbers; default: %(default)s).")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed warm-up runs (default: %(default)s).")
    parser.add_argument("--rounds", type=int, default=6, help="Rounds the runs are spread over, each visiting every "
                                                              "path in turn (default: %(default)s).")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="Default: 1 32.")
    parser.add_argument("--texts", type=int, default=256, help="Distinct query texts cycled (default: %(default)s).")
    parser.add_argument("--also-head", nargs="+", default=[], metavar="DIR",
                        help="More heads whose (c) is timed in the same process, against the same teacher runs.")
    args = parser.parse_args()
    name = args.name or "latency"
    spec = resolve_head(args.head)
    started = time.perf_counter()
    model, teacher, description = load_model_and_teacher(spec, args.layer, args.head_type)
    texts = query_texts(Path(args.data), max(args.texts, max(args.batch_sizes)))
    result: dict[str, Any] = {
        "benchmark": "latency", "machine": machine_info(), "runs": args.runs, "warmup": args.warmup,
        "rounds": args.rounds,
        "data": Path(args.data).name, "head": {**head_summary(model), "description": description, "spec": spec},
        "batches": [],
    }
    also = {}
    for other_spec in args.also_head:
        other = load_model_and_teacher(other_spec, load_teacher=False)[0]
        also[other_spec] = other
        summary = head_summary(other)
        result.setdefault("also_heads", {})[other_spec] = {
            **summary, "spec": other_spec,
            "description": f"{summary['head_type']} head ({Path(other_spec).name}, layer {summary['layer']})"}
    for threads in args.threads or [torch.get_num_threads()]:
        set_threads(threads)
        for b in args.batch_sizes:
            result["batches"].append(measure(model, teacher, texts, b, args.runs, args.warmup, args.rounds, also))
            r = result["batches"][-1]
            print(f"batch {b}, {threads} thread(s): " + ", ".join(f"{k} {r[k]['median_ms']:.3f} ms" for k in PATHS),
                  flush=True)
    result["machine"]["torch_threads"] = sorted({r["threads"] for r in result["batches"]})
    result["wall_s"] = round(time.perf_counter() - started, 1)
    publish(name, result, markdown, plot, args.results)


if __name__ == "__main__":
    main()
