"""Summarise benchmarks/results/ in the README's results section: one table of headline numbers, then links.

Rewrites the block between `<!-- results:start -->` and `<!-- results:end -->` in README.md (the markers are
appended at the end of the file when missing; nothing outside them changes). The headline table is read from
`quality.json` (test nDCG@10, head vs teacher, per dataset and mean; the static peer) and `latency.json` (encode
latency, teacher vs head, batch 1 and 32); every result table (`*.md`, in a fixed order: quality, latency, memory,
throughput, then the rest alphabetically) is linked with its title, the quality and latency plots are shown, and
the machine each result was measured on (CPU model, cores, torch threads, from the results' JSON) is stated. The
full tables stay in `benchmarks/results/` only: the README does not repeat them. Usage:

    .venv/bin/python benchmarks/report.py [--results benchmarks/results] [--readme README.md] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from common import RESULTS, ROOT, cpu_name

START, END = "<!-- results:start -->", "<!-- results:end -->"
ORDER = ("quality", "latency", "memory", "throughput")


def machine_of(json_path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    machine = data.get("machine")
    return machine if isinstance(machine, dict) and "cpu" in machine else None


def ordered(results: Path) -> list[Path]:
    """Result tables in ORDER; a named variant (`quality_linear`) follows its benchmark, the rest alphabetically."""
    files = sorted(results.glob("*.md"))
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(files, key=lambda p: (rank.get(p.stem, rank.get(p.stem.split("_")[0], len(ORDER))), p.stem))


def hardware(machine: dict[str, Any]) -> str:
    """The machine without the per-run parts (threads, load): CPU, cores, memory, GPU, torch version."""
    text = (f"{cpu_name(machine)}, {machine['usable_cores']} usable cores ({machine['logical_cores']} logical, "
            f"{machine.get('physical_cores')} physical), {machine['memory_gib']} GiB RAM, torch {machine['torch']}")
    return text + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")


def threads_of(json_path: Path, machine: dict[str, Any] | None) -> str:
    if machine is not None:
        threads = machine.get("torch_threads")
        return "/".join(map(str, threads)) if isinstance(threads, list) else str(threads)
    try:  # results written without a machine record (e.g. agent_turn) may name their threads elsewhere
        return str(json.loads(json_path.read_text(encoding="utf-8")).get("setup", {}).get("threads", "?"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return "?"


def _json(results: Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((results / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def headline_rows(results: Path) -> list[str]:
    """Markdown rows `| what | teacher | head | head vs teacher |` from quality.json and latency.json."""
    rows = []
    quality = _json(results, "quality")
    if quality:
        for d in quality.get("datasets", []):
            m = d["metrics"]
            rows.append(f"| nDCG@10, {d['dataset']} test ({d['queries']} q) | {m['teacher']['ndcg@10']:.3f} | "
                        f"{m['head']['ndcg@10']:.3f} | {d['retention']['ndcg@10']:.1%} retained |")
        mean = quality.get("mean_retention", {}).get("ndcg@10")
        static = quality.get("peers", {}).get("mean_retention", {}).get("static", {}).get("ndcg@10")
        if mean is not None:
            peer = f" (static peer distilled from the teacher: {static:.1%})" if static is not None else ""
            rows.append(f"| **nDCG@10, mean of the test splits** | | | **{mean:.1%} retained**{peer} |")
    latency = _json(results, "latency")
    if latency:
        default = latency.get("head", {}).get("quantize_to")  # the precision the head loads with
        for b in latency.get("batches", []):
            key = f"head_{default}" if default and f"head_{default}" in b else "head"
            other = "head" if key != "head" else "head_float16"
            label = {"head": "fp32", "head_float16": "float16"}
            speed = b["teacher"]["median_ms"] / b[key]["median_ms"]
            slower = b["teacher"]["median_ms"] / b[other]["median_ms"] if other in b else float("nan")
            rows.append(f"| encode latency, batch {b['batch_size']} (median ms; head on the LM's states, "
                        f"{label.get(key, default)} weights: the default) | {b['teacher']['median_ms']:.2f} | "
                        f"{b[key]['median_ms']:.3f} | {speed:.0f}x faster ({label[other]} weights {slower:.0f}x) |")
    return rows


def title_of(md: Path) -> str:
    first = md.read_text(encoding="utf-8").lstrip().splitlines()[:1]
    return first[0].lstrip("#").strip() if first else md.stem


def build_section(results: Path, readme: Path, heading: bool = True) -> str:
    files = ordered(results)
    lines = ["## Results", ""] if heading else []
    if not files:
        lines.append("No benchmark results yet: run the scripts in `benchmarks/`, then `benchmarks/report.py`.")
        return "\n".join(lines)
    rel = Path(os.path.relpath(results, readme.parent)).as_posix()
    rows = headline_rows(results)
    if rows:
        head = _json(results, "quality") or {}
        spec = head.get("head", {}).get("spec", "the shipped head")
        lines += [f"Headline numbers of `{spec}` against its teacher, measured side by side (full tables linked "
                  "below):", "", "| | teacher | head | head vs teacher |", "|---|---:|---:|---|", *rows, ""]
    for plot in ("quality", "latency"):
        if (results / f"{plot}.png").is_file():
            lines.append(f"![{plot}]({rel}/{plot}.png)")
    lines += ["", "All results (each script in `benchmarks/` writes its JSON and table there):", ""]
    titles = [title_of(md) for md in files]
    lines += [f"- [{t}]({rel}/{md.name})" + (f" (`{md.stem}`)" if titles.count(t) > 1 else "")
              for t, md in zip(titles, files, strict=True)]
    machines: dict[str, list[str]] = {}
    for md in files:
        json_path = md.with_suffix(".json")
        machine = machine_of(json_path)
        key = hardware(machine) if machine else "machine not recorded"
        machines.setdefault(key, []).append(f"{md.stem} ({threads_of(json_path, machine)})")
    lines += ["", "Measured on (torch threads in brackets):"]
    lines += [f"- {desc}: {', '.join(stems)}" for desc, stems in machines.items()]
    lines += ["", "Generated by `benchmarks/report.py` from `benchmarks/results/` (rerun a script, then this)."]
    return "\n".join(lines)


def has_results_heading(readme_text: str) -> bool:
    """Whether the README already heads the block with its own '## Results' heading."""
    before = readme_text.split(START, 1)[0] if START in readme_text else ""
    headings = re.findall(r"^#+\s+(.+?)\s*$", before, re.MULTILINE)
    return bool(headings) and headings[-1].lower() == "results"


def rewrite(readme_text: str, section: str) -> str:
    """README text with the block between the markers replaced (markers appended when missing)."""
    block = f"{START}\n{section.strip()}\n{END}"
    if START in readme_text and END in readme_text:
        head, rest = readme_text.split(START, 1)
        _, tail = rest.split(END, 1)
        return head + block + tail
    if START in readme_text or END in readme_text:
        raise ValueError(f"README has only one of the markers {START} / {END}; fix it by hand")
    return readme_text.rstrip("\n") + "\n\n" + block + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(RESULTS), help="Results folder (default: benchmarks/results).")
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="README to rewrite (default: %(default)s).")
    parser.add_argument("--check", action="store_true", help="Only say whether the README is up to date (exit 1 "
                                                              "when it is not).")
    args = parser.parse_args()
    readme = Path(args.readme)
    text = readme.read_text(encoding="utf-8")
    try:
        new = rewrite(text, build_section(Path(args.results), readme, heading=not has_results_heading(text)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        print("README results are up to date" if new == text else "README results are out of date")
        return 0 if new == text else 1
    readme.write_text(new, encoding="utf-8")
    print(f"rewrote the results block of {readme} from {len(ordered(Path(args.results)))} result file(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
