"""Hub round trips over real HTTP: push_to_hub, from_pretrained, Auto classes, SentenceTransformer, errors.

Everything talks to the loopback Hub server (tests/hub_server.py) through the stock huggingface_hub client and
transformers; the base is a tiny random LM pushed to that server and named by its repo id.
"""

from _hub_env import setup_hub_env

setup_hub_env()  # HF_ENDPOINT & co. must be set before huggingface_hub / transformers are imported

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hub_server import HubServer  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tiny import save_tiny, tiny_causal_lm  # noqa: E402

from retrieval_head import HeadFolderError, RetrievalHeadConfig, RetrievalModel, get_retrieval_model  # noqa: E402
from retrieval_head.io.embedded import load_base  # noqa: E402
from retrieval_head.io.folder import WEIGHTS_NAME  # noqa: E402
from retrieval_head.io.hub import HEAD_REPO_FILES, CorruptedDownloadError  # noqa: E402
from retrieval_head.io.sentence_transformers_modules import load_sentence_transformer  # noqa: E402

pytest_plugins = ["hub_fixtures"]

ALICE, BOB = "hf_alice", "hf_bob"
TEXTS = ["where can I park my car near the hotel", "is breakfast included", ""]
CONVERSATION = [
    {"role": "user", "content": "I need a hotel in the centre"},
    {"role": "assistant", "content": "The Grand has rooms."},
    {"role": "user", "content": "do they allow pets?"},
]
TEACHER = {"teacher_id": "sentence-transformers/all-MiniLM-L6-v2", "revision": None, "dim": 16,
           "similarity_fn_name": "cosine", "normalized": True, "probe_checksum": "0" * 64}


def new_repo_id(prefix: str = "head") -> str:
    return f"alice/{prefix}-{uuid.uuid4().hex[:8]}"


def head_config(**overrides) -> RetrievalHeadConfig:
    settings = dict(output_dim=16, inner_dim=32, teacher=dict(TEACHER), prompts={"query": "query: ", "document": ""},
                    metrics={"tiny": {"head": {"recall@10": 0.5}, "teacher": {"recall@10": 0.6}}})
    settings.update(overrides)
    return RetrievalHeadConfig(**settings)


@pytest.fixture(scope="module")
def api(hub: HubServer) -> HfApi:
    assert HfApi().endpoint == hub.url
    return HfApi()


@pytest.fixture(scope="module")
def base_repo(api: HfApi, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random llama + chat tokenizer on the Hub server (public)."""
    folder = save_tiny(tmp_path_factory.mktemp("base"))
    repo_id = api.create_repo(new_repo_id("tiny-llama"), token=ALICE).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=folder, token=ALICE, commit_message="tiny base")
    return repo_id


@pytest.fixture(scope="module")
def model(base_repo: str) -> RetrievalModel:
    """A head on the Hub base, named by its repo id."""
    base, tokenizer = load_base(base_repo)
    m = get_retrieval_model(base, head_config(), tokenizer=tokenizer)
    assert m.config.base_model_name_or_path == base_repo
    return m


@pytest.fixture(scope="module")
def pushed(api: HfApi, model: RetrievalModel) -> tuple[str, str]:
    """The head pushed once (commit "v1", tagged v1); returns (repo_id, commit sha)."""
    repo_id = new_repo_id()
    commit = model.push_to_hub(repo_id, token=ALICE, commit_message="v1")
    api.create_tag(repo_id, tag="v1", revision=commit.oid, token=ALICE)
    return repo_id, commit.oid


def assert_same(a, b, tol: float = 1e-5) -> None:
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < tol


def test_push_uploads_only_head_files(api: HfApi, pushed: tuple[str, str]) -> None:
    repo_id, sha = pushed
    files = set(api.list_repo_files(repo_id))
    assert files == {".gitattributes", *HEAD_REPO_FILES}
    info = api.model_info(repo_id, files_metadata=True)
    weights = next(s for s in info.siblings if s.rfilename == WEIGHTS_NAME)
    assert weights.lfs is not None  # safetensors went through LFS
    assert api.list_repo_commits(repo_id)[0].title == "v1" and info.sha == sha


def test_push_again_makes_a_second_commit_and_revisions_load(
    api: HfApi, model: RetrievalModel, base_repo: str
) -> None:
    repo_id = new_repo_id()
    first = model.push_to_hub(repo_id, token=ALICE, commit_message="v1")
    api.create_tag(repo_id, tag="v1", revision=first.oid, token=ALICE)
    base, tokenizer = load_base(base_repo)
    retrained = get_retrieval_model(base, head_config(seed=1), tokenizer=tokenizer)
    second = retrained.push_to_hub(repo_id, token=ALICE, commit_message="v2")
    assert first.oid != second.oid
    assert [c.title for c in api.list_repo_commits(repo_id)][:2] == ["v2", "v1"]

    for revision, expected in (("v1", model), (first.oid, model), (None, retrained), ("main", retrained)):
        loaded = RetrievalModel.from_pretrained(repo_id, revision=revision)
        assert_same(loaded.encode(TEXTS), expected.encode(TEXTS))


def test_push_to_a_branch(api: HfApi, model: RetrievalModel) -> None:
    repo_id = new_repo_id()
    model.push_to_hub(repo_id, token=ALICE, revision="dev", commit_message="on dev")
    assert "dev" in {b.name for b in api.list_repo_refs(repo_id).branches}
    assert not api.file_exists(repo_id, "config.json")  # main untouched
    assert_same(RetrievalModel.from_pretrained(repo_id, revision="dev").encode(TEXTS), model.encode(TEXTS))


def test_private_repo_needs_the_right_token(api: HfApi, model: RetrievalModel, tmp_path: Path) -> None:
    repo_id = new_repo_id("private")
    model.push_to_hub(repo_id, private=True, token=ALICE)
    assert api.model_info(repo_id, token=ALICE).private
    loaded = RetrievalModel.from_pretrained(repo_id, token=ALICE, cache_dir=tmp_path / "alice")
    assert_same(loaded.encode(TEXTS), model.encode(TEXTS))
    # Fresh caches: on a 404 the stock client falls back to files an authorised download left in the same cache.
    for token in (False, BOB):
        with pytest.raises(RepositoryNotFoundError, match=repo_id):
            RetrievalModel.from_pretrained(repo_id, token=token, cache_dir=tmp_path / f"other-{token}")
    with pytest.raises(HfHubHTTPError, match="token") as wrong:
        RetrievalModel.from_pretrained(repo_id, token="hf_wrong", cache_dir=tmp_path / "wrong")
    assert wrong.value.response.status_code == 401


def test_wrong_token_push_uploads_nothing(api: HfApi, model: RetrievalModel, pushed: tuple[str, str]) -> None:
    repo_id, sha = pushed
    with pytest.raises(HfHubHTTPError) as err:
        model.push_to_hub(repo_id, token="hf_wrong")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as other:
        model.push_to_hub(repo_id, token=BOB)  # a valid token without write access
    assert other.value.response.status_code == 403
    assert api.model_info(repo_id).sha == sha
    with pytest.raises(HfHubHTTPError):
        model.push_to_hub(new_repo_id("never"), token="hf_wrong")


def test_sentence_transformer_from_repo(model: RetrievalModel, pushed: tuple[str, str]) -> None:
    from sentence_transformers import SentenceTransformer

    repo_id, _ = pushed
    st = load_sentence_transformer(repo_id, revision="v1")
    assert st.similarity_fn_name == "cosine" and st.prompts["query"] == "query: "
    assert st.get_embedding_dimension() == 16
    assert_same(st.encode(TEXTS), model.encode(TEXTS))
    assert_same(st.encode_query(TEXTS), model.encode_query(TEXTS))
    assert_same(st.encode(CONVERSATION), model.encode(CONVERSATION))
    flagged = SentenceTransformer(repo_id, trust_remote_code=True)
    assert_same(flagged.encode(TEXTS), model.encode(TEXTS))


def test_auto_model_from_repo(model: RetrievalModel, pushed: tuple[str, str]) -> None:
    from transformers import AutoConfig, AutoModel

    repo_id, _ = pushed
    assert AutoConfig.from_pretrained(repo_id).model_type == "retrieval_head"
    auto = AutoModel.from_pretrained(repo_id, revision="v1")
    assert isinstance(auto, RetrievalModel)
    assert_same(auto.encode(TEXTS), model.encode(TEXTS))


@pytest.mark.slow  # a subprocess: importing torch + transformers + sentence-transformers again takes seconds
def test_offline_reload_from_cache(hub: HubServer, model: RetrievalModel, pushed: tuple[str, str],
                                   tmp_path: Path) -> None:
    repo_id, _ = pushed
    RetrievalModel.from_pretrained(repo_id, revision="v1")  # fills the cache (head and base)
    expected = tmp_path / "expected.npy"
    np.save(expected, model.encode(TEXTS))
    served = len(hub.requests)
    script = (
        "import sys, numpy as np\n"
        "from retrieval_head import RetrievalModel\n"
        "m = RetrievalModel.from_pretrained(sys.argv[1], revision='v1')\n"
        f"print(float(np.abs(m.encode({TEXTS!r}) - np.load(sys.argv[2])).max()))\n"
        "m = RetrievalModel.from_pretrained(sys.argv[1], revision='v1', local_files_only=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, repo_id, str(expected)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) < 1e-5
    assert len(hub.requests) == served  # nothing reached the server


def test_local_files_only_without_cache_says_so(pushed: tuple[str, str], tmp_path: Path) -> None:
    repo_id, _ = pushed
    with pytest.raises(LocalEntryNotFoundError, match=repo_id):
        RetrievalModel.from_pretrained(repo_id, local_files_only=True, cache_dir=tmp_path)


def test_local_path_wins_over_hub_id(model: RetrievalModel, pushed: tuple[str, str], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    repo_id, _ = pushed
    base, tokenizer = load_base(model.config.base_model_name_or_path)
    other = get_retrieval_model(base, head_config(seed=7), tokenizer=tokenizer)
    other.save_pretrained(tmp_path / repo_id)  # a folder named like the repo id
    monkeypatch.chdir(tmp_path)
    loaded = RetrievalModel.from_pretrained(repo_id)
    assert_same(loaded.encode(TEXTS), other.encode(TEXTS))


def test_missing_repo_and_revision_name_the_repo(pushed: tuple[str, str]) -> None:
    repo_id, _ = pushed
    with pytest.raises(RepositoryNotFoundError, match="alice/no-such-head"):
        RetrievalModel.from_pretrained("alice/no-such-head")
    with pytest.raises(RevisionNotFoundError, match=f"'no-such-branch'.*{repo_id}"):
        RetrievalModel.from_pretrained(repo_id, revision="no-such-branch")


def test_peft_adapter_repo_is_refused(api: HfApi, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_causal_lm(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path)
    repo_id = api.create_repo(new_repo_id("lora"), token=ALICE).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path, token=ALICE)
    with pytest.raises(HeadFolderError, match=r"(?s)not a retrieval head.*PEFT adapter.*adapter_config\.json.*"
                                              r"Expected a retrieval head"):
        RetrievalModel.from_pretrained(repo_id)


def test_plain_model_repo_is_refused_without_downloading_its_weights(base_repo: str, tmp_path: Path) -> None:
    with pytest.raises(HeadFolderError, match=r"(?s)plain model.*model_type='llama'.*Expected a retrieval head"):
        RetrievalModel.from_pretrained(base_repo, cache_dir=tmp_path)
    assert list(tmp_path.glob("**/snapshots/*/config.json")) and not list(tmp_path.glob("**/*.safetensors"))


def test_corrupted_download_is_refused_and_not_reused(
    hub: HubServer, model: RetrievalModel, tmp_path: Path
) -> None:
    repo_id = new_repo_id("corrupt")
    base, tokenizer = load_base(model.config.base_model_name_or_path)
    own = get_retrieval_model(base, head_config(seed=3), tokenizer=tokenizer)  # the blob store is shared
    own.push_to_hub(repo_id, token=ALICE)
    hub.corrupt(repo_id, WEIGHTS_NAME)  # same size, every byte flipped: the client's size check passes
    for _ in range(2):  # the second load downloads again instead of trusting the bad cache entry
        with pytest.raises(CorruptedDownloadError, match=rf"(?s){WEIGHTS_NAME}.*{repo_id}.*corrupted"):
            RetrievalModel.from_pretrained(repo_id, cache_dir=tmp_path)
        assert not list(tmp_path.glob(f"**/snapshots/*/{WEIGHTS_NAME}"))
    downloads = [r for r in hub.requests if r.startswith(f"GET /{repo_id}/resolve/") and r.endswith(WEIGHTS_NAME)]
    assert len(downloads) >= 2


def test_newer_config_with_extra_keys_loads_with_a_warning(
    api: HfApi, model: RetrievalModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(library_version="9.0.0", future_option={"enabled": True})
    (tmp_path / "config.json").write_text(json.dumps(config))
    repo_id = api.create_repo(new_repo_id("future"), token=ALICE).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path, token=ALICE)
    with caplog.at_level(logging.WARNING, logger="retrieval_head"):
        loaded = RetrievalModel.from_pretrained(repo_id)
    assert "future_option" in caplog.text and "9.0.0" in caplog.text
    assert_same(loaded.encode(TEXTS), model.encode(TEXTS))


def test_existing_readme_is_updated_not_clobbered(api: HfApi, model: RetrievalModel) -> None:
    repo_id = api.create_repo(new_repo_id("card"), token=ALICE).repo_id
    user_card = "---\nlicense: apache-2.0\ntags:\n- my-tag\n---\n\n# My head\n\nNotes the owner wrote.\n"
    api.upload_file(path_or_fileobj=user_card.encode(), path_in_repo="README.md", repo_id=repo_id, token=ALICE)
    for _ in range(2):
        model.push_to_hub(repo_id, token=ALICE)
        card = Path(api.hf_hub_download(repo_id, "README.md")).read_text()
        assert "Notes the owner wrote." in card and "license: apache-2.0" in card
        assert "- my-tag" in card and "- retrieval-head" in card
        assert card.count("<!-- retrieval-head:begin") == 1 and "## Usage" in card
    model.push_to_hub(repo_id, token=ALICE, overwrite_card=True)
    card = Path(api.hf_hub_download(repo_id, "README.md")).read_text()
    assert "Notes the owner wrote." not in card and "<!-- retrieval-head:begin" in card
    assert torch.is_tensor(model.encode(TEXTS, convert_to_tensor=True))


def test_a_standalone_export_is_pushed_and_loads_from_the_hub_with_no_flag(api: HfApi, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from tiny import tiny_causal_lm, tiny_tokenizer

    from retrieval_head.io.export import export_sentence_transformer, push_export

    base = tiny_causal_lm()
    with torch.no_grad():
        base.get_input_embeddings().weight.mul_(50)  # states at a real LM's scale (LayerNorm's epsilon aside)
    config = head_config(prompts={"query": "", "document": ""}, layer=2)
    model = get_retrieval_model(base, config, tokenizer=tiny_tokenizer())
    folder = export_sentence_transformer(model, tmp_path / "standalone")["path"]
    repo_id = new_repo_id("standalone")
    push_export(folder, repo_id, token=ALICE, private=True)
    assert "modules.json" in api.list_repo_files(repo_id, token=ALICE)
    loaded = SentenceTransformer(repo_id, token=ALICE, device="cpu")  # over HTTP, no trust_remote_code
    assert_same(loaded.encode(TEXTS[:2]), model.encode(TEXTS[:2]))
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_files(repo_id, token=BOB)  # private: another user cannot read it
