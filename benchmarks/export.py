"""The standalone sentence-transformers export beside the head it came from, side by side in one process.

Exports `--head` (default: the shipped linear head; a static-branch head is refused and the refusal recorded)
with `retrieval_head.io.export`, loads it with `SentenceTransformer(folder)` (no `trust_remote_code`) and
reports, on real query texts: the max abs difference from `RetrievalModel.encode`, and `encode()` latency on new
text at each batch size for the teacher, `RetrievalModel.encode` and the export (median of `--runs`, every
path visited in turn). Writes benchmarks/results/export.{json,md}. Usage:

    .venv/bin/python benchmarks/export.py [--head DIR] [--runs 30] [--batch-sizes 1 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import DATA, ROOT, describe_machine, fmt, machine_info, publish, repo_relative, summarize
from latency import query_texts, time_interleaved

PATHS = {"teacher": "teacher `encode`", "head": "`RetrievalModel.encode` (the head's own path)",
         "export": "`SentenceTransformer(export).encode` (built-in modules, no flag)"}
DEFAULT_HEAD = ROOT / "heads" / "smollm2-135m-minilm-linear"
REFUSED_HEAD = ROOT / "heads" / "smollm2-135m-minilm"


def refusal(head: Path) -> str | None:
    """Why `head` cannot be exported (None when it can)."""
    from retrieval_head import RetrievalModel
    from retrieval_head.io.export import exportable

    return exportable(RetrievalModel.from_pretrained(head))


def encoders(teacher: Any, model: Any, st: Any, texts: list[str], batch: int) -> dict[str, Any]:
    """`fn(i)` per path: embed the i-th batch of `batch` texts (cycled)."""
    chunks = [texts[i:i + batch] for i in range(0, len(texts) - batch + 1, batch)]
    return {"teacher": lambda i: teacher.encode(chunks[i % len(chunks)], batch_size=batch),
            "head": lambda i: model.encode_query(chunks[i % len(chunks)], batch_size=batch),
            "export": lambda i: st.encode_query(chunks[i % len(chunks)], batch_size=batch)}


def measure(head: Path, texts: list[str], batch_sizes: list[int], runs: int, rounds: int) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    from retrieval_head import RetrievalModel
    from retrieval_head.io.embedded import load_teacher_by_id
    from retrieval_head.io.export import export_sentence_transformer

    model = RetrievalModel.from_pretrained(head)
    teacher = load_teacher_by_id(model.config.teacher["teacher_id"], model.config.teacher.get("revision"))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        exported = export_sentence_transformer(model, Path(tmp) / "export")
        export_s = time.perf_counter() - started
        size = sum(p.stat().st_size for p in Path(exported["path"]).rglob("*") if p.is_file())
        st = SentenceTransformer(exported["path"], device="cpu")
        diff = float(np.abs(st.encode_query(texts, batch_size=32) - model.encode_query(texts, batch_size=32)).max())
        batches = []
        for b in batch_sizes:
            times = time_interleaved(encoders(teacher, model, st, texts, b), runs, warmup=3, rounds=rounds)
            batches.append({"batch_size": b, **{k: summarize(v) for k, v in times.items()}})
            print(f"batch {b}: " + ", ".join(f"{k} {batches[-1][k]['median_ms']:.1f} ms" for k in PATHS), flush=True)
    return {"head": repo_relative(str(head)), "layers": exported["layers"], "export_s": round(export_s, 1),
            "export_mb": round(size / 2**20, 1), "max_abs_diff": diff, "texts": len(texts), "batches": batches}


def markdown(result: dict[str, Any]) -> str:
    lines = ["## Standalone sentence-transformers export", "",
             f"Head: {result['head']} (base cut to {result['layers']} layers); {result['texts']} SciFact query texts; "
             f"median of {result['runs']} runs per path, every path visited in turn. "
             f"{describe_machine(result['machine'])}.", "",
             f"Max abs difference, export vs `RetrievalModel.encode`: **{result['max_abs_diff']:.1e}** "
             f"(target <= 1e-5). Export: {result['export_s']} s, {result['export_mb']} MB (fp32 base, cut).", "",
             "| path | " + " | ".join(f"batch {r['batch_size']} (ms)" for r in result["batches"]) + " |",
             "|---|" + "---:|" * len(result["batches"])]
    for key, label in PATHS.items():
        lines.append(f"| {label} | " + " | ".join(fmt(r[key]["median_ms"], 1) for r in result["batches"]) + " |")
    lines.append("| export / head | " + " | ".join(
        f"{r['export']['median_ms'] / r['head']['median_ms']:.2f}x" for r in result["batches"]) + " |")
    if result.get("refused"):
        lines += ["", f"Not exported: {result['refused']['head']}, because {result['refused']['why']} "
                      "(it loads with the package's own modules instead)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default=str(DEFAULT_HEAD), help="Head folder (default: the shipped linear head).")
    parser.add_argument("--runs", type=int, default=30, help="Timed runs per path and batch size.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds that visit every path in turn.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="Output folder.")
    args = parser.parse_args()
    texts = query_texts(DATA / "scifact_train", 256)
    result = {"benchmark": "export", "machine": machine_info(), "runs": args.runs,
              **measure(Path(args.head), texts, args.batch_sizes, args.runs, args.rounds)}
    why = refusal(REFUSED_HEAD)
    if why:
        result["refused"] = {"head": repo_relative(str(REFUSED_HEAD)), "why": why}
    publish("export", result, markdown, None, args.results)


if __name__ == "__main__":
    main()
