"""Memory: the head's parameters and file size, and the peak RSS of query encoding with and without the teacher.

Each configuration runs in its own fresh subprocess (so one's allocations never inflate another's peak):
- `libraries`: torch + transformers + sentence-transformers + retrieval_head imported, no model;
- `head`: base LM + head loaded, `encode_query` on the queries (the native path: no second model);
- `head+teacher`: base LM + head + teacher loaded, both encode the queries (a two-model agent: the LM that
  writes the query plus an embedding model);
- `teacher`: the teacher alone encoding the queries (for reference).
Peak RSS is the process's `ru_maxrss`. An untrained head (`--head untrained`) is saved to a temporary folder
first; its size equals a trained one's. Writes benchmarks/results/memory.{json,md}. Usage:

    .venv/bin/python benchmarks/memory.py [--head DIR|untrained] [--queries 64] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    DATA,
    UNTRAINED,
    add_common_arguments,
    describe_machine,
    machine_info,
    resolve_head,
    set_threads,
    write_results,
)

MODES = ("libraries", "head", "head+teacher", "teacher")
MIB = 2**20


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak resident set size of this process in bytes since start or the last `reset_peak()`: VmHWM on Linux,
    else ru_maxrss (KiB on Linux, bytes on macOS; never reset)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(mode: str, head: str, data: str, queries: int, batch_size: int) -> dict[str, Any]:
    """Run one configuration in this (fresh) process; returns its measurements."""
    start_rss = rss()
    import sentence_transformers  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import retrieval_head  # noqa: F401
    from retrieval_head.retrieval.data import load_dataset_folder

    texts = [q.text for q in load_dataset_folder(data).queries[:queries]]
    out: dict[str, Any] = {"mode": mode, "start_rss": start_rss, "libraries_rss": rss()}
    model = teacher = None
    if mode in ("head", "head+teacher"):
        from retrieval_head import RetrievalModel

        model = RetrievalModel.from_pretrained(head).eval()
        out["head_parameters"] = model.num_head_parameters()
        out["base_parameters"] = sum(p.numel() for p in model.base_model.parameters())
    if mode in ("head+teacher", "teacher"):
        from retrieval_head.io.embedded import TEACHER_ID, load_teacher_by_id

        info = (model.config.teacher or {}) if model is not None else {}
        teacher = load_teacher_by_id(info.get("teacher_id", TEACHER_ID), info.get("revision"))
        out["teacher_parameters"] = sum(p.numel() for p in teacher.parameters())
    out["loaded_rss"] = rss()
    out["load_peak_rss"] = peak_rss()
    out["peak_reset"] = reset_peak()
    started = time.perf_counter()
    with torch.inference_mode():
        if model is not None:
            model.encode_query(texts, batch_size=batch_size)
        if teacher is not None:
            teacher.encode(texts, batch_size=batch_size)
    out["encode_s"] = time.perf_counter() - started
    out["after_encode_rss"] = rss()
    out["peak_rss"] = peak_rss()  # during encode when the reset worked, else since the start
    return out


def save_untrained(folder: Path, layer: int, head_type: str) -> None:
    from common import load_model_and_teacher

    model, _, _ = load_model_and_teacher(UNTRAINED, layer, head_type)
    model.save_pretrained(folder)


def run_child(mode: str, head: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", mode, "--head", head, "--data", args.data,
               "--queries", str(args.queries), "--batch-size", str(args.batch_size)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: the {mode} subprocess failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def folder_size(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    h = result["head"]
    lines = [
        "## Memory",
        "",
        f"Head: {result['head_description']}. {result['queries']} queries encoded at batch size "
        f"{result['batch_size']}; each row a fresh process. Machine: {describe_machine(result['machine'])}.",
        "",
        f"- head parameters: **{h['parameters']:,}** ({h['parameters'] / max(h['base_parameters'], 1):.2%} of the "
        f"base's {h['base_parameters']:,}); head weights file: **{h['weights_bytes'] / MIB:.2f} MiB** "
        f"(folder {h['folder_bytes'] / MIB:.2f} MiB); the teacher has {result['teacher_parameters']:,} parameters.",
        "",
        "| process | peak RSS while loading (MiB) | peak RSS during encode (MiB) | RSS after encode (MiB) "
        "| encode (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    labels = {"libraries": "libraries only (no model)", "head": "LM + head (native: no teacher)",
              "head+teacher": "LM + head + teacher (two models)", "teacher": "teacher alone"}
    for mode in MODES:
        r = runs[mode]
        encode = "—" if mode == "libraries" else f"{r['encode_s']:.2f}"
        lines.append(f"| {labels[mode]} | {r['load_peak_rss'] / MIB:.0f} | {r['peak_rss'] / MIB:.0f} | "
                     f"{r['after_encode_rss'] / MIB:.0f} | {encode} |")
    steady = runs["head+teacher"]["after_encode_rss"] - runs["head"]["after_encode_rss"]
    peak = runs["head+teacher"]["peak_rss"] - runs["head"]["peak_rss"]
    lines += ["", f"Dropping the teacher from an agent that already holds the LM saves {steady / MIB:.0f} MiB of RSS "
                  f"after encoding (peak during encoding: {peak / MIB:+.0f} MiB, within run-to-run noise of the LM's "
                  "activations); the head itself costs its weights file's size. Weights are memory-mapped, so RSS "
                  "grows as they are first used: the encode columns are the steady state."]
    if not all(r.get("peak_reset") for r in runs.values()):
        lines.append("(This system could not reset the peak between loading and encoding: peaks include loading.)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--data", default=str(DATA / "scifact_train"), help="Queries to encode (default: %(default)s).")
    parser.add_argument("--queries", type=int, default=64, help="Queries encoded (default: %(default)s).")
    parser.add_argument("--batch-size", type=int, default=32, help="Encode batch size (default: %(default)s).")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.head, args.data, args.queries, args.batch_size)))
        return
    spec = resolve_head(args.head)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(spec)
        description = spec
        if spec == UNTRAINED:
            folder = Path(tmp) / "untrained-head"
            save_untrained(folder, args.layer, args.head_type)
            description = f"untrained {args.head_type} head at layer {args.layer}"
        elif not folder.is_dir():
            from retrieval_head.io.load import resolve_head_folder

            folder = resolve_head_folder(spec)
        sizes = folder_size(folder)
        runs = {}
        for mode in MODES:
            runs[mode] = run_child(mode, str(folder), args)
            print(f"{mode}: load peak {runs[mode]['load_peak_rss'] / MIB:.0f} MiB, encode peak "
                  f"{runs[mode]['peak_rss'] / MIB:.0f} MiB", file=sys.stderr, flush=True)
    name = args.name or "memory"
    result = {
        "benchmark": "memory", "machine": machine_info(), "head_description": description, "spec": spec,
        "queries": args.queries, "batch_size": args.batch_size, "data": Path(args.data).name,
        "head": {"parameters": runs["head"]["head_parameters"], "base_parameters": runs["head"]["base_parameters"],
                 "weights_bytes": sum(v for k, v in sizes.items() if k.endswith(".safetensors")),
                 "folder_bytes": sum(sizes.values()), "files": sizes},
        "teacher_parameters": runs["teacher"]["teacher_parameters"],
        "runs": runs,
    }
    text = markdown(result)
    write_results(name, result, text, args.results)
    print(text)


if __name__ == "__main__":
    main()
