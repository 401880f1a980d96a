"""The test Hub server, driven only through the stock huggingface_hub client (and transformers)."""

from _hub_env import setup_hub_env

setup_hub_env()  # HF_ENDPOINT & co. must be set before huggingface_hub is imported

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hub_server import HubServer, git_blob_sha1  # noqa: E402
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

pytest_plugins = ["hub_fixtures"]

ALICE, BOB = "hf_alice", "hf_bob"
CONFIG = json.dumps({"hidden_size": 8}).encode()


def weights(seed: str, size: int = 4096) -> bytes:
    """Deterministic bytes, unique per seed (so corrupting one blob touches no other test's file)."""
    out = b""
    while len(out) < size:
        out += hashlib.sha256(f"{seed}{len(out)}".encode()).digest()
    return out[:size]


def new_repo(api: HfApi, private: bool = False, token: str = ALICE) -> str:
    """Create a uniquely named repo in alice's namespace."""
    return api.create_repo(f"alice/repo-{uuid.uuid4().hex[:8]}", private=private, token=token).repo_id


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    """A client for the running server (HF_ENDPOINT already points at it)."""
    assert HfApi().endpoint == hub.url
    return HfApi()


@pytest.fixture
def uploaded(api: HfApi, tmp_path: Path) -> tuple[str, bytes]:
    """A public repo with config.json (regular) and model.safetensors (LFS) on main."""
    repo_id = new_repo(api)
    (tmp_path / "config.json").write_bytes(CONFIG)
    data = weights(repo_id)
    (tmp_path / "model.safetensors").write_bytes(data)
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path, token=ALICE, commit_message="add model")
    return repo_id, data


def test_upload_folder_uses_lfs_and_downloads_back(
    hub: HubServer, api: HfApi, uploaded: tuple[str, bytes]
) -> None:
    repo_id, data = uploaded
    sha256 = hashlib.sha256(data).hexdigest()
    assert f"PUT /lfs-objects/{sha256}" in hub.requests
    assert f"POST /{repo_id}.git/info/lfs/objects/batch" in hub.requests

    info = api.model_info(repo_id, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == {".gitattributes", "config.json", "model.safetensors"}
    assert (
        siblings["model.safetensors"].lfs is not None and siblings["model.safetensors"].lfs.sha256 == sha256
    )
    assert siblings["config.json"].lfs is None and siblings["config.json"].blob_id == git_blob_sha1(CONFIG)
    assert sorted(api.list_repo_files(repo_id)) == sorted(siblings)

    weights_path = Path(hf_hub_download(repo_id, "model.safetensors"))
    config_path = Path(hf_hub_download(repo_id, "config.json"))
    assert weights_path.read_bytes() == data and config_path.read_bytes() == CONFIG
    # The cache names blobs after X-Linked-Etag (sha256) for LFS files, after the ETag (git sha1) otherwise.
    assert weights_path.resolve().name == sha256
    assert config_path.resolve().name == git_blob_sha1(CONFIG)
    assert api.file_exists(repo_id, "model.safetensors") and not api.file_exists(repo_id, "missing.bin")


def test_commits_tags_and_revisions(api: HfApi) -> None:
    repo_id = new_repo(api)
    v1, v2 = weights(repo_id + "v1"), weights(repo_id + "v2", 3000)
    first = api.create_commit(
        repo_id,
        [CommitOperationAdd("model.safetensors", v1), CommitOperationAdd("notes/a.txt", b"a")],
        commit_message="v1",
        token=ALICE,
    )
    api.create_tag(repo_id, tag="v1", revision=first.oid, token=ALICE)
    second = api.create_commit(
        repo_id,
        [CommitOperationAdd("model.safetensors", v2), CommitOperationDelete("notes/a.txt")],
        commit_message="v2",
        token=ALICE,
    )
    assert len(first.oid) == len(second.oid) == 40 and first.oid != second.oid

    refs = api.list_repo_refs(repo_id)
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", second.oid)]
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", first.oid)]
    assert [c.title for c in api.list_repo_commits(repo_id)] == ["v2", "v1", "initial commit"]
    assert api.model_info(repo_id, revision="v1").sha == first.oid
    assert api.model_info(repo_id).sha == second.oid

    for revision, expected in (("v1", v1), (first.oid, v1), ("main", v2), (second.oid, v2)):
        assert Path(hf_hub_download(repo_id, "model.safetensors", revision=revision)).read_bytes() == expected
    assert api.file_exists(repo_id, "notes/a.txt", revision="v1")
    assert not api.file_exists(repo_id, "notes/a.txt")

    tagged = Path(snapshot_download(repo_id, revision="v1"))
    assert tagged.name == first.oid and (tagged / "notes" / "a.txt").read_bytes() == b"a"
    assert Path(snapshot_download(repo_id, revision=first.oid)) == tagged
    latest = Path(snapshot_download(repo_id))
    assert latest.name == second.oid and not (latest / "notes").exists()
    assert (latest / "model.safetensors").read_bytes() == v2


def test_range_reads_through_hf_file_system(uploaded: tuple[str, bytes]) -> None:
    repo_id, data = uploaded
    with HfFileSystem().open(f"{repo_id}/model.safetensors", "rb", block_size=512) as handle:
        handle.seek(1000)
        assert handle.read(100) == data[1000:1100]


def test_private_repo_needs_the_owners_token(api: HfApi, tmp_path: Path) -> None:
    repo_id = new_repo(api, private=True)
    api.upload_file(path_or_fileobj=CONFIG, path_in_repo="config.json", repo_id=repo_id, token=ALICE)
    assert api.model_info(repo_id, token=ALICE).private
    owner_cache, other_cache = tmp_path / "alice", tmp_path / "other"
    assert (
        Path(hf_hub_download(repo_id, "config.json", token=ALICE, cache_dir=owner_cache)).read_bytes()
        == CONFIG
    )

    for token in (False, BOB):  # anonymous and another user: hidden, as on the Hub
        with pytest.raises(RepositoryNotFoundError) as err:
            api.model_info(repo_id, token=token)
        assert err.value.response.status_code == 404
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(repo_id, "config.json", token=token, cache_dir=other_cache)
        # Surprise of the stock client: on a 404 it falls back to whatever a previous (authorised) download
        # left in the same cache.
        assert Path(hf_hub_download(repo_id, "config.json", token=token, cache_dir=owner_cache)).exists()
    with pytest.raises(HfHubHTTPError) as bad:
        api.model_info(repo_id, token="hf_wrong")
    assert bad.value.response.status_code == 401 and not isinstance(bad.value, RepositoryNotFoundError)


def test_writes_need_the_owners_token(api: HfApi, uploaded: tuple[str, bytes]) -> None:
    repo_id, _ = uploaded
    for token in (False, BOB):
        with pytest.raises(HfHubHTTPError) as err:
            api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, token=token)
        assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as anonymous:
        api.create_repo("alice/anonymous", token=False)
    assert anonymous.value.response.status_code == 403
    assert api.whoami(token=BOB)["name"] == "bob"


def test_missing_repo_revision_and_file(api: HfApi, uploaded: tuple[str, bytes]) -> None:
    repo_id, _ = uploaded
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/does-not-exist", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.json")

    api.delete_repo(repo_id, token=ALICE)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)
    api.delete_repo(repo_id, token=ALICE, missing_ok=True)


def test_corrupted_download(hub: HubServer, api: HfApi, uploaded: tuple[str, bytes]) -> None:
    repo_id, data = uploaded
    hub.corrupt(repo_id, "model.safetensors")
    # huggingface_hub checks only the size of a plain HTTP download: same-size garbage lands in the cache
    # under the advertised sha256, and only a checksum pass notices.
    path = Path(hf_hub_download(repo_id, "model.safetensors"))
    assert path.read_bytes() != data and path.resolve().name == hashlib.sha256(data).hexdigest()
    report = api.verify_repo_checksums(repo_id, cache_dir=constants.HF_HUB_CACHE)
    assert [m["path"] for m in report.mismatches] == ["model.safetensors"]

    hub.corrupt(repo_id, "model.safetensors", data[:100])
    with pytest.raises(OSError, match="Consistency check failed"):
        hf_hub_download(repo_id, "model.safetensors", force_download=True)


def test_offline_reload_from_cache(hub: HubServer, api: HfApi, uploaded: tuple[str, bytes]) -> None:
    repo_id, data = uploaded
    api.create_tag(repo_id, tag="v1", token=ALICE)
    online = snapshot_download(repo_id, revision="v1")
    served = len(hub.requests)
    script = (
        "import sys\nfrom huggingface_hub import hf_hub_download, snapshot_download\n"
        "print(snapshot_download(sys.argv[1], revision='v1'))\n"
        "print(hf_hub_download(sys.argv[1], 'model.safetensors', revision='v1'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, repo_id],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    snapshot, weights_path = result.stdout.split()
    assert snapshot == online and Path(weights_path).read_bytes() == data
    assert len(hub.requests) == served  # nothing reached the server


def test_transformers_from_pretrained(api: HfApi, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=8,
        max_position_embeddings=16,
    )
    model = transformers.BertModel(config)
    model.save_pretrained(tmp_path)
    repo_id = new_repo(api)
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path, token=ALICE)
    api.create_tag(repo_id, tag="v1", token=ALICE)

    loaded = transformers.AutoModel.from_pretrained(repo_id, revision="v1")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
