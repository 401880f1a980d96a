"""Shared by the benchmark scripts: the machine description, loading the head, writing results."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DATA = ROOT / "data"
SHIPPED_HEAD = ROOT / "heads" / "smollm2-135m-minilm"
DATASETS = ("dstc11_track5_val_reviewdoc", "scifact_train", "covidqa", "nq_open_oracle")
UNTRAINED = "untrained"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else `platform`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU model and vector ISA, cores, torch threads, memory, versions, load."""
    import psutil
    import torch

    from retrieval_head.core.base import native_bfloat16

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the widest vector ISA torch uses: AVX2, AVX512
        "native_bfloat16": native_bfloat16(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_name(info: dict[str, Any]) -> str:
    """'AMD EPYC (AVX2)', 'AMD EPYC (AVX512, native bf16)'; the bare model for results recorded before the ISA was."""
    if "cpu_capability" not in info:
        return info["cpu"]
    return f"{info['cpu']} ({info['cpu_capability']}{', native bf16' if info.get('native_bfloat16') else ''})"


def describe_machine(info: dict[str, Any]) -> str:
    """One line, e.g. 'AMD EPYC, 2 cores, 2 torch threads, 15.6 GiB, torch 2.13.0+cpu (load 4.7)'."""
    threads = info["torch_threads"]
    threads = "/".join(map(str, threads)) if isinstance(threads, list) else threads
    text = (f"{cpu_name(info)}, {info['usable_cores']} usable cores ({info['logical_cores']} logical), "
            f"{threads} torch thread(s), {info['memory_gib']} GiB RAM, torch {info['torch']}")
    if info.get("gpu"):
        text += f", GPU {info['gpu']}"
    if info.get("load_average_1m") is not None:
        text += f"; 1-min load average {info['load_average_1m']} at start"
    return text


def add_common_arguments(parser: argparse.ArgumentParser, head_default: str | None = None,
                         several_threads: bool = False) -> None:
    parser.add_argument(
        "--head", default=head_default,
        help="Head folder or Hub repo; 'untrained' = a fresh head (--layer, --head-type) on the embedded SmolLM2 "
             f"fitted to the embedded teacher (default: {head_default or SHIPPED_HEAD.relative_to(ROOT)} "
             "when it exists, else untrained)")
    parser.add_argument("--layer", type=int, default=20, help="Layer of an untrained head (default: %(default)s).")
    parser.add_argument("--head-type", default="mlp", help="Type of an untrained head (default: %(default)s).")
    if several_threads:
        parser.add_argument("--threads", type=int, nargs="+", default=None,
                            help="torch thread settings to measure, each for every path (default: torch's own).")
    else:
        parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own).")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="Precision the base LM is loaded in (a trained head's; default: %(default)s).")
    parser.add_argument("--results", default=str(RESULTS), help="Output folder (default: benchmarks/results).")
    parser.add_argument("--name", default=None, help="Result file name stem (default: the benchmark's name).")


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The bundled datasets to evaluate, where they live, and the teacher index / embedding caches."""
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), help="Default: every bundled dataset.")
    parser.add_argument("--data-root", default=str(DATA), help="Folder of the datasets (default: %(default)s).")
    parser.add_argument("--index-dir", default=str(ROOT / ".cache" / "indexes"),
                        help="Where teacher indexes are kept and reused ('' to never save; default: %(default)s).")
    parser.add_argument("--embeddings", default=str(ROOT / ".cache" / "features"),
                        help="Teacher embedding cache (training's; the shipped data/teacher-embeddings is read too): "
                             "a new index reuses documents the same teacher already embedded ('' to always "
                             "embed; default: %(default)s).")
    parser.add_argument("--max-queries", type=int, default=None, help="Seeded sample of test queries per dataset.")


def resolve_head(spec: str | None) -> str:
    """The head to load: the given one, else the shipped head when it exists, else 'untrained'."""
    if spec:
        return spec
    if not (SHIPPED_HEAD / "config.json").is_file():
        return UNTRAINED
    return os.path.relpath(SHIPPED_HEAD)  # relative: results name no machine path


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def load_model_and_teacher(spec: str, layer: int = 20, head_type: str = "mlp", device: str | None = None,
                           load_teacher: bool = True, dtype: str = "float32") -> tuple[Any, Any, str]:
    """(RetrievalModel, teacher or None, description). 'untrained' attaches a fresh head to the embedded agent;
    a trained head's base is loaded in `dtype`."""
    import torch

    from retrieval_head import RetrievalHeadConfig, RetrievalModel, get_retrieval_model
    from retrieval_head.io.embedded import BASE_ID, load_embedded_base, load_teacher_by_id
    from retrieval_head.io.embedded import load_teacher as load_embedded_teacher
    from retrieval_head.retrieval.fingerprint import TeacherFingerprint

    if spec == UNTRAINED:
        teacher = load_embedded_teacher(device)
        fingerprint = TeacherFingerprint.from_sentence_transformer(teacher)
        base, tokenizer = load_embedded_base()
        config = RetrievalHeadConfig(base_model_name_or_path=BASE_ID, layer=layer, head_type=head_type,
                                     output_dim=fingerprint.dim, teacher=fingerprint.to_dict(), max_length=256)
        model = get_retrieval_model(base, config, tokenizer=tokenizer)
        if device:
            model.to(device)
        return model.eval(), (teacher if load_teacher else None), f"untrained {head_type} head at layer {layer}"
    model = RetrievalModel.from_pretrained(spec, device=device, dtype=getattr(torch, dtype)).eval()
    teacher = None
    if load_teacher:
        info = model.config.teacher or {}
        if not info.get("teacher_id"):
            raise SystemExit(f"error: the head {spec} records no teacher")
        teacher = load_teacher_by_id(info["teacher_id"], info.get("revision"), device=device)
    precision = "" if dtype == "float32" else f", base in {dtype}"
    return model, teacher, f"{spec} ({model.config.head_type} head, layer {model.config.layer}{precision})"


def head_summary(model: Any) -> dict[str, Any]:
    c = model.config
    return {"base": c.base_model_name_or_path, "layer": c.layer, "pooling": c.pooling, "head_type": c.head_type,
            "inner_dim": c.inner_dim, "parameters": model.num_head_parameters(),
            "teacher": (c.teacher or {}).get("teacher_id"), "quantize_to": c.quantize_to}


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median / mean / p10 / p90 in milliseconds, and the number of runs."""
    ms = sorted(1000 * s for s in seconds)
    q = statistics.quantiles(ms, n=10) if len(ms) >= 2 else [ms[0]] * 9
    return {"median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "p10_ms": q[0], "p90_ms": q[-1],
            "runs": len(ms)}


def repo_relative(text: str) -> str:
    """`text` with this checkout's absolute path removed (results name `heads/...`, not a machine's folder)."""
    return text.replace(f"{ROOT}/", "").replace(str(ROOT), ".")


def write_results(name: str, data: dict[str, Any], markdown: str, folder: str | Path = RESULTS) -> Path:
    """`<folder>/<name>.json` (sorted, indented) and `<name>.md`; returns the JSON path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    (out / f"{name}.json").write_text(repo_relative(text), encoding="utf-8")
    (out / f"{name}.md").write_text(repo_relative(markdown.rstrip()) + "\n", encoding="utf-8")
    print(f"wrote {out / (name + '.json')} and {name}.md", file=sys.stderr)
    return out / f"{name}.json"


def publish(name: str, result: dict[str, Any], markdown: Any, plot: Any = None,
            folder: str | Path = RESULTS) -> str:
    """Write `<name>.png` (when `plot(result, path)` draws one; recorded as `result["plot"]`), then the JSON and
    the `markdown(result)` table; print and return the table."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if plot is not None and plot(result, out / f"{name}.png"):
        result["plot"] = f"{name}.png"
    text = markdown(result)
    write_results(name, result, text, out)
    print(text)
    return text


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"
