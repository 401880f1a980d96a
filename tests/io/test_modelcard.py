"""Model cards: Hub metadata, the body's sections, merging into an existing README, the shipped template."""

from _hub_env import setup_hub_env

setup_hub_env()  # HF_ENDPOINT & co. must be set before huggingface_hub / transformers are imported

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402
from tiny import save_tiny  # noqa: E402

from retrieval_head import RetrievalHeadConfig, get_retrieval_model  # noqa: E402
from retrieval_head.io.embedded import load_base  # noqa: E402
from retrieval_head.io.modelcard import (  # noqa: E402
    BEGIN,
    END,
    losses_text,
    merge_card,
    render_card,
    result_rows,
    template_text,
)

TEACHER = {"teacher_id": "sentence-transformers/all-MiniLM-L6-v2", "revision": "c9745ed", "dim": 384,
           "similarity_fn_name": "cosine", "normalized": True, "probe_checksum": "ab" * 32}
METRICS = {
    "dstc11_track5": {"head": {"recall@10": 0.607, "mrr@10": 0.293}, "teacher": {"recall@10": 0.637, "mrr@10": 0.329},
                      "split": "test"},
    "covidqa": {"head": {"ndcg@10": 0.35}},
    "speed": {"head_ms_per_query": 2.0, "teacher_ms_per_query": 43.5, "device": "H100"},
}
TRAINING = {"epochs": 80, "lr": 2e-4, "losses": {"cosine": 1.0, "infonce": 1.0, "rank_kl": 0.5},
            "datasets": ["alice/dstc11-queries", "dstc11_track5_val_reviewdoc"]}


def config(**overrides) -> RetrievalHeadConfig:
    settings = dict(base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", revision="main",
                    base_architecture="LlamaForCausalLM", base_hidden_size=576, base_num_layers=30,
                    teacher=dict(TEACHER), metrics=METRICS, training=TRAINING, layer=-8)
    settings.update(overrides)
    return RetrievalHeadConfig(**settings)


def metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_metadata_in_hub_conventions() -> None:
    data = metadata(render_card(config(), repo_id="alice/smollm2-minilm-head"))
    assert data["library_name"] == "sentence-transformers" and data["pipeline_tag"] == "sentence-similarity"
    assert {"retrieval-head", "sentence-transformers", "feature-extraction"} <= set(data["tags"])
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and data["base_model_relation"] == "adapter"
    assert data["datasets"] == ["alice/dstc11-queries"]  # only Hub ids
    (entry,) = data["model-index"]
    assert entry["name"] == "smollm2-minilm-head"
    metrics = {(r["dataset"]["name"], m["type"]): m["value"] for r in entry["results"] for m in r["metrics"]}
    assert metrics[("dstc11_track5", "cosine_recall@10")] == 0.607
    assert metrics[("dstc11_track5", "retention_recall@10")] == pytest.approx(0.607 / 0.637, abs=1e-4)
    assert metrics[("covidqa", "cosine_ndcg@10")] == 0.35 and ("covidqa", "retention_ndcg@10") not in metrics
    parsed = ModelCard(render_card(config(), repo_id="alice/x")).data  # huggingface_hub reads it back
    assert parsed.eval_results and parsed.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_body_sections() -> None:
    card = render_card(config(), repo_id="alice/smollm2-minilm-head", num_head_parameters=25_000_000)
    body = card.split("---", 2)[2]
    for text in ("25,000,000 parameters", "layer -8", "## Model details", "### Teacher fingerprint", "ab" * 32,
                 "c9745ed", "## Training", "InfoNCE", "KL divergence", "(weight 0.5)", "## Results",
                 "| dstc11_track5 | recall@10 | 0.607 | 0.637 | 95.3% |", "### Speed", "43.5", "## Usage",
                 'RetrievalModel.from_pretrained("alice/smollm2-minilm-head")',
                 'AutoModel.from_pretrained("alice/smollm2-minilm-head")',
                 'load_sentence_transformer("alice/smollm2-minilm-head")', "trust_remote_code=True",
                 "## Limitations", "pays a forward pass", "agent path"):
        assert text in body, text
    assert body.strip().startswith(BEGIN) and body.strip().endswith(END)


def test_untrained_local_head_card() -> None:
    card = render_card(config(base_model_name_or_path="/tmp/some/base", teacher=None, metrics=None, training=None))
    data = metadata(card)
    assert "base_model" not in data and "model-index" not in data  # a local path is no Hub id
    assert "Not evaluated yet" in card and "No training recipe recorded" in card and "`/tmp/some/base`" in card


def test_flat_metrics_shape() -> None:
    rows = result_rows({"dataset": "scifact", "head": {"ndcg@10": 0.5}, "teacher": {"ndcg@10": 0.625}})
    assert [(r.dataset, r.metric, r.retained) for r in rows] == [("scifact", "ndcg@10", "80.0%")]


def test_merge_keeps_user_text_and_metadata() -> None:
    user = "---\nlicense: mit\nlanguage: en\ntags:\n- mine\n---\n\n# My head\n\nHand-written notes.\n"
    first = merge_card(user, render_card(config(), repo_id="alice/h"))
    data = metadata(first)
    assert data["license"] == "mit" and data["language"] == "en" and data["tags"][0] == "mine"
    assert "retrieval-head" in data["tags"] and "Hand-written notes." in first
    assert first.index("Hand-written notes.") < first.index(BEGIN)
    # A later render replaces only our section; the user's edits around it stay.
    edited = first.replace("Hand-written notes.", "Edited notes.") + "\nA footer.\n"
    second = merge_card(edited, render_card(config(metrics=None), repo_id="alice/h"))
    assert second.count(BEGIN) == 1 and "Edited notes." in second and "A footer." in second
    assert "Not evaluated yet" in second and "95.3%" not in second and "model-index" not in metadata(second)
    assert merge_card(second, render_card(config(metrics=None), repo_id="alice/h")) == second  # idempotent
    assert merge_card(None, "x") == "x" and merge_card("  \n", "x") == "x"


def test_template_ships_in_the_package() -> None:
    import retrieval_head

    path = Path(retrieval_head.__file__).parent / "model_cards" / "template.md"
    assert path.is_file() and template_text() == path.read_text(encoding="utf-8")
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"model_cards/*.md"' in pyproject  # package-data: the template goes into the wheel


def test_save_pretrained_writes_and_updates_the_card(tmp_path: Path) -> None:
    base, tokenizer = load_base(str(save_tiny(tmp_path / "base")))
    model = get_retrieval_model(base, RetrievalHeadConfig(output_dim=16, inner_dim=32), tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "head")
    readme = tmp_path / "head" / "README.md"
    assert BEGIN in readme.read_text()
    readme.write_text(readme.read_text() + "\n## My notes\n\nKeep me.\n")
    model.save_pretrained(tmp_path / "head")
    assert "Keep me." in readme.read_text() and readme.read_text().count(BEGIN) == 1
    model.save_pretrained(tmp_path / "head", overwrite_card=True)
    assert "Keep me." not in readme.read_text()


def test_head_row_names_the_inner_dim_only_for_heads_that_have_one() -> None:
    assert "`mlp`, inner dim 1024, reads layer" in render_card(config(head_type="mlp", inner_dim=1024))
    assert "`linear`, reads layer" in render_card(config(head_type="linear", inner_dim=1024))


def test_contrastive_loss_is_described_by_its_positives() -> None:
    label_free = losses_text({"losses": {"contrastive": 0.1}, "gold_positives": False})
    gold = losses_text({"losses": {"contrastive": 0.1}, "gold_positives": True})
    assert "same query is the positive" in label_free and "label-free" in label_free
    assert "gold documents" in gold and "label-free" not in gold
