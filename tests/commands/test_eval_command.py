"""`retrieval-head eval`: tiny head + tiny sentence-transformers teacher + tiny dataset, all in tmp folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from eval_helpers import load_teacher, write_dataset, write_head, write_teacher

from retrieval_head.cli import main
from retrieval_head.retrieval.data import load_dataset_folder
from retrieval_head.retrieval.index import DocumentIndex


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("eval-command")
    teacher_dir = write_teacher(root / "teacher")
    return SimpleNamespace(root=root, data=write_dataset(root / "data"), teacher=teacher_dir,
                           other=write_teacher(root / "other", seed=1),
                           head=write_head(root / "head", teacher_dir, root / "base"))


def run(world: SimpleNamespace, *extra: str) -> int:
    return main(["eval", "--head", str(world.head), "--data", str(world.data), *extra])


def test_eval_prints_a_table_writes_json_and_reuses_the_index(world, tmp_path: Path, capsys) -> None:
    out, index = tmp_path / "results.json", tmp_path / "index"
    assert run(world, "--split", "all", "--output", str(out), "--index", str(index)) == 0
    printed = capsys.readouterr().out
    for label in ("nDCG@10", "R@1", "R@5", "R@10", "R@100", "MRR@10", "retained", "bm25", "top-10 agreement"):
        assert label in printed
    assert "index built and saved to" in printed
    report = json.loads(out.read_text())
    assert report["queries"] == 30 and report["split"]["name"] == "all"
    assert set(report["metrics"]) == {"head", "teacher", "bm25"}
    assert set(report["retention"]) >= {"ndcg@10", "recall@10", "mrr@10"}
    assert report["teacher"]["teacher_id"] == str(world.teacher)
    assert (index / "index.faiss").is_file()

    assert run(world, "--split", "all", "--output", str(out), "--index", str(index)) == 0
    assert "index loaded from" in capsys.readouterr().out
    assert json.loads(out.read_text())["metrics"] == report["metrics"]


def test_embedding_cache_is_filled_then_reused_with_the_same_results(world, tmp_path: Path, capsys) -> None:
    cache, first, second = tmp_path / "embeddings", tmp_path / "first.json", tmp_path / "second.json"
    assert run(world, "--split", "all", "--embeddings", str(cache), "--output", str(first)) == 0
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and entries[0].startswith("teacher-document-")
    stored = (cache / entries[0] / "tensors.safetensors").stat().st_mtime_ns
    assert run(world, "--split", "all", "--embeddings", str(cache), "--output", str(second)) == 0
    assert "built from the embedding cache" in capsys.readouterr().out
    assert (cache / entries[0] / "tensors.safetensors").stat().st_mtime_ns == stored  # read, not rewritten
    assert json.loads(second.read_text())["metrics"] == json.loads(first.read_text())["metrics"]
    assert run(world, "--split", "all", "--output", str(second)) == 0  # the same index without the cache
    assert json.loads(second.read_text())["metrics"]["teacher"] == json.loads(first.read_text())["metrics"]["teacher"]


def test_the_default_split_is_the_held_out_test_split(world, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert run(world, "--output", str(out), "--no-bm25") == 0
    report = json.loads(out.read_text())
    test = load_dataset_folder(world.data).split().test
    assert report["queries"] == len(test.relevant_docs())
    assert report["split"] == {"name": "test", "max_queries": None, "dev": 0.1, "test": 0.2, "seed": 0}
    assert "bm25" not in report["metrics"]


def test_max_queries_samples(world, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert run(world, "--split", "all", "--max-queries", "7", "--output", str(out)) == 0
    assert json.loads(out.read_text())["queries"] == 7


def test_an_index_built_by_another_teacher_is_refused(world, tmp_path: Path, capsys) -> None:
    DocumentIndex.build(load_teacher(world.other), load_dataset_folder(world.data)).save(tmp_path / "foreign")
    assert run(world, "--index", str(tmp_path / "foreign")) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "teacher" in err


def test_missing_files_are_named(world, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(world.data, broken)
    (broken / "qrels.tsv").unlink()
    assert main(["eval", "--head", str(world.head), "--data", str(broken)]) == 2
    assert "qrels.tsv" in capsys.readouterr().err


def test_ids_that_do_not_resolve_are_named(world, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(world.data, broken)
    with (broken / "qrels.tsv").open("a") as f:
        f.write("q0\tnot-a-doc\t1\n")
    assert main(["eval", "--head", str(world.head), "--data", str(broken)]) == 2
    assert "not-a-doc" in capsys.readouterr().err


def test_a_head_without_teacher_is_refused(world, tmp_path: Path, capsys) -> None:
    head = tmp_path / "head"
    shutil.copytree(world.head, head)
    config = json.loads((head / "config.json").read_text())
    config["teacher"] = None
    (head / "config.json").write_text(json.dumps(config))
    assert main(["eval", "--head", str(head), "--data", str(world.data)]) == 2
    assert "records no teacher" in capsys.readouterr().err


def test_eval_of_a_head_with_int8_weights_records_them(world, tmp_path: Path, capsys) -> None:
    out = tmp_path / "int8.json"
    assert run(world, "--split", "all", "--quantize-head-to", "int8", "--no-bm25", "--output", str(out)) == 0
    assert "int8 weights" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["head_weights"] == "int8" and report["queries"] == 30
