"""A saved head loads as a SentenceTransformer and gives the same vectors as RetrievalModel.encode."""

from _hub_env import setup_hub_env

setup_hub_env()  # HF_ENDPOINT & co. must be set before huggingface_hub / transformers are imported

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from tiny import save_tiny  # noqa: E402

from retrieval_head import RetrievalHeadConfig, RetrievalModel, get_retrieval_model  # noqa: E402
from retrieval_head.io.embedded import load_base  # noqa: E402
from retrieval_head.io.folder import HEAD_CLASS, INPUT_CLASS  # noqa: E402
from retrieval_head.io.sentence_transformers_modules import (  # noqa: E402
    RetrievalHeadInput,
    RetrievalHeadPooling,
    load_sentence_transformer,
)

TEXTS = ["where can I park my car near the hotel", "is breakfast included", "", "what is the capital of France"]
CONVERSATIONS = [
    [{"role": "user", "content": "a hotel in the centre"}, {"role": "assistant", "content": "The Grand."},
     {"role": "user", "content": "do they allow pets?"}],
    [{"role": "user", "content": "vegetarian food?"}],
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("base"))


def make_head(base_dir: Path, folder: Path, **overrides) -> RetrievalModel:
    base, tokenizer = load_base(str(base_dir))
    settings = dict(output_dim=16, inner_dim=32, prompts={"query": "query: ", "document": "passage: "},
                    teacher={"teacher_id": "t", "revision": None, "dim": 16, "similarity_fn_name": "cosine",
                             "normalized": True, "probe_checksum": "c"})
    settings.update(overrides)
    model = get_retrieval_model(base, RetrievalHeadConfig(**settings), tokenizer=tokenizer)
    for module in (model.head.attend, getattr(model.head, "static_out", None)):
        if module is not None:  # both start at zero: give them weights that change the embedding
            torch.nn.init.normal_(module.weight, generator=torch.Generator().manual_seed(5))
    model.save_pretrained(folder)
    return model


def assert_same(a, b) -> None:
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-5


@pytest.fixture(scope="module")
def saved(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RetrievalModel, Path]:
    folder = tmp_path_factory.mktemp("head")
    return make_head(base_dir, folder), folder


def test_folder_carries_sentence_transformers_files(saved: tuple[RetrievalModel, Path]) -> None:
    _, folder = saved
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"] for m in modules] == [INPUT_CLASS, HEAD_CLASS] and {m["path"] for m in modules} == {""}
    st_config = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert st_config["model_type"] == "SentenceTransformer" and st_config["similarity_fn_name"] == "cosine"
    assert st_config["prompts"] == {"query": "query: ", "document": "passage: "}
    assert "retrieval_head" in st_config["__version__"]


def test_same_vectors_as_encode(saved: tuple[RetrievalModel, Path]) -> None:
    model, folder = saved
    st = load_sentence_transformer(folder)
    assert isinstance(st[0], RetrievalHeadInput) and isinstance(st[1], RetrievalHeadPooling)
    assert st.get_embedding_dimension() == 16 and st.similarity_fn_name == "cosine"
    for batch_size in (1, 3, 32):
        assert_same(st.encode(TEXTS, batch_size=batch_size), model.encode(TEXTS))
    assert_same(st.encode(TEXTS[0]), model.encode(TEXTS[0]))  # one string: a 1-D vector on both sides
    assert st.encode(TEXTS[0]).shape == (16,)
    assert_same(st.encode(CONVERSATIONS), model.encode(CONVERSATIONS))
    assert_same(st.encode(CONVERSATIONS[0]), model.encode(CONVERSATIONS[0]))
    assert_same(st.encode_query(TEXTS), model.encode_query(TEXTS))
    assert_same(st.encode_document(TEXTS), model.encode_document(TEXTS))
    assert_same(st.encode(TEXTS, prompt_name="query"), model.encode(TEXTS, prompt_name="query"))
    assert not np.allclose(st.encode_query(TEXTS), st.encode(TEXTS))  # the prompt is applied


def test_trust_remote_code_flag(saved: tuple[RetrievalModel, Path]) -> None:
    """sentence-transformers >= 6 asks for the flag for any class outside its namespace, installed or not."""
    model, folder = saved
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(folder))
    st = SentenceTransformer(str(folder), trust_remote_code=True)
    assert_same(st.encode(TEXTS), model.encode(TEXTS))


def test_sentence_transformers_save_round_trip(saved: tuple[RetrievalModel, Path], tmp_path: Path) -> None:
    model, folder = saved
    load_sentence_transformer(folder).save(str(tmp_path))
    assert (tmp_path / "retrieval_head.safetensors").exists()
    assert_same(load_sentence_transformer(tmp_path).encode(TEXTS), model.encode(TEXTS))
    assert_same(RetrievalModel.from_pretrained(tmp_path).encode(TEXTS), model.encode(TEXTS))


@pytest.mark.parametrize(
    "overrides",
    [dict(head_type="transformer", pooling="last_token", layer=1, num_attention_heads=4),
     dict(head_type="mlp", pooling="attention", static_dim=4, num_attention_heads=4),
     dict(head_type="linear", query_template="plain", normalize=False,
          teacher={"teacher_id": "t", "revision": None, "dim": 16, "similarity_fn_name": "dot",
                   "normalized": False, "probe_checksum": "c"})],
)
def test_other_heads(base_dir: Path, tmp_path: Path, overrides: dict) -> None:
    model = make_head(base_dir, tmp_path, **overrides)
    st = load_sentence_transformer(tmp_path)
    assert st.similarity_fn_name == overrides.get("teacher", {}).get("similarity_fn_name", "cosine")
    assert_same(st.encode(TEXTS), model.encode(TEXTS))
    assert_same(st.encode(CONVERSATIONS), model.encode(CONVERSATIONS))


def test_a_static_branch_over_the_base_embeddings_gives_the_same_vectors(base_dir: Path, tmp_path: Path) -> None:

    base, tokenizer = load_base(str(base_dir))
    config = RetrievalHeadConfig(output_dim=16, inner_dim=32, static_dim=4, static_base_embeddings=True)
    model = get_retrieval_model(base, config, tokenizer=tokenizer)
    torch.nn.init.normal_(model.head.static_out.weight, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    plain = get_retrieval_model(load_base(str(base_dir))[0], RetrievalHeadConfig(output_dim=16, inner_dim=32),
                                tokenizer=tokenizer)
    assert np.abs(model.encode(TEXTS[:2]) - plain.encode(TEXTS[:2])).max() > 1e-3  # the branch adds something
    assert_same(load_sentence_transformer(tmp_path).encode(TEXTS), model.encode(TEXTS))
    assert_same(RetrievalModel.from_pretrained(tmp_path).encode(CONVERSATIONS), model.encode(CONVERSATIONS))


def st_evaluators(model: RetrievalModel) -> list:
    from sentence_transformers.sentence_transformer import evaluation as ev

    queries = {"q1": "where can I park my car", "q2": "is breakfast included", "q3": "vegetarian food"}
    corpus = {"d1": "parking near the hotel", "d2": "breakfast is included in the price",
              "d3": "the capital of France", "d4": "the restaurant serves vegetarian food"}
    relevant = {"q1": {"d1"}, "q2": {"d2"}, "q3": {"d4"}}
    pairs = (["a hotel", "pets allowed", "free parking", "a bar"], ["the hotel", "no pets", "parking", "food"])
    return [
        ev.InformationRetrievalEvaluator(queries, corpus, relevant, name="ir"),
        ev.EmbeddingSimilarityEvaluator(*pairs, [0.9, 0.2, 0.8, 0.1]),
        ev.TripletEvaluator(pairs[0], pairs[1], ["France", "Paris", "a car", "hotel"]),
        ev.ParaphraseMiningEvaluator({"1": "a hotel", "2": "the hotel", "3": "vegetarian food"}, [("1", "2")]),
        ev.RerankingEvaluator([{"query": "a hotel", "positive": ["the hotel"], "negative": ["France", "pets"]}]),
        ev.BinaryClassificationEvaluator(*pairs, [1, 0, 1, 0]),
        ev.MSEEvaluator(pairs[0], pairs[0], teacher_model=model),
    ]


def test_sentence_transformers_evaluators_run_on_the_model_and_its_st_form_alike(saved) -> None:
    model, folder = saved
    st = load_sentence_transformer(folder)
    assert model.similarity_fn_name == st.similarity_fn_name == "cosine"
    assert model.get_max_seq_length() == model.max_seq_length == model.config.max_length
    for evaluator in st_evaluators(model):
        ours, theirs = evaluator(model), evaluator(st)
        assert ours.keys() == theirs.keys() and ours, type(evaluator).__name__
        for key, value in ours.items():
            assert abs(value - theirs[key]) < 1e-4, (type(evaluator).__name__, key)
        assert evaluator in model.model_card_data.eval_results_dict
    assert model.encode(TEXTS[:2], precision=None).dtype == np.float32


def test_similarity_follows_the_teachers_function(base_dir: Path, tmp_path: Path) -> None:
    from sentence_transformers import util

    teacher = {"teacher_id": "t", "revision": None, "dim": 16, "similarity_fn_name": "dot", "normalized": False,
               "probe_checksum": "c"}
    model = make_head(base_dir, tmp_path, normalize=False, teacher=teacher)
    a, b = model.encode(TEXTS[:2], convert_to_tensor=True), model.encode(TEXTS[1:], convert_to_tensor=True)
    assert model.similarity_fn_name == "dot"
    assert torch.allclose(model.similarity(a, b), util.dot_score(a, b), atol=1e-5)
    assert torch.allclose(model.similarity_pairwise(a, b[:2]), (a * b[:2]).sum(-1), atol=1e-5)
    hits = util.semantic_search(a, b, top_k=2, score_function=util.dot_score)
    assert [h["corpus_id"] for h in hits[0]] == model.similarity(a[:1], b)[0].argsort(descending=True)[:2].tolist()


def test_a_conversation_wide_static_branch_gives_the_same_vectors(base_dir: Path, tmp_path: Path) -> None:

    base, tokenizer = load_base(str(base_dir))
    config = RetrievalHeadConfig(output_dim=16, inner_dim=32, static_dim=4, static_span="conversation")
    model = get_retrieval_model(base, config, tokenizer=tokenizer)
    torch.nn.init.normal_(model.head.static_out.weight, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    again = RetrievalModel.from_pretrained(tmp_path)
    assert again.config.static_span == "conversation"
    assert_same(load_sentence_transformer(tmp_path).encode(CONVERSATIONS), model.encode(CONVERSATIONS))
    assert_same(again.encode(CONVERSATIONS), model.encode(CONVERSATIONS))
    assert_same(load_sentence_transformer(tmp_path).encode(TEXTS), model.encode(TEXTS))


def test_the_configs_head_precision_is_what_sentence_transformers_runs(base_dir: Path, tmp_path: Path) -> None:
    make_head(base_dir, tmp_path, quantize_to="float16", static_dim=4)
    st = load_sentence_transformer(tmp_path)
    assert st[1].head.quantized_to == "float16"
    assert_same(st.encode(TEXTS), RetrievalModel.from_pretrained(tmp_path).encode(TEXTS))
