"""Hub I/O through huggingface_hub: download a head's files (checked), and push a head (`push_head`).

Only a head's own files travel: `config.json`, `retrieval_head.safetensors`, `modules.json`,
`config_sentence_transformers.json` and `README.md`. The base model is referenced by id + revision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from retrieval_head.adapters.encode_adapter import ENCODE_ADAPTER_DIR
from retrieval_head.core.config import CONFIG_NAME, MODEL_TYPE
from retrieval_head.io.folder import MODULES_NAME, ST_CONFIG_NAME, WEIGHTS_NAME, HeadFolderError
from retrieval_head.io.modelcard import CARD_NAME

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from retrieval_head.core.model import RetrievalModel

logger = logging.getLogger(__name__)

HEAD_REPO_FILES = (CONFIG_NAME, WEIGHTS_NAME, MODULES_NAME, ST_CONFIG_NAME, CARD_NAME)
"""The files of a head in a repo: what `push_to_hub` uploads and `download_head` fetches."""
HEAD_REPO_PATTERNS = (*HEAD_REPO_FILES, f"{ENCODE_ADAPTER_DIR}/*")
"""Those, plus the optional encode adapter's subfolder (checked by its checksum in the config on load)."""
EXPECTED = (
    f"a retrieval head ({CONFIG_NAME} with model_type={MODEL_TYPE!r} and {WEIGHTS_NAME}, as written by "
    "RetrievalModel.save_pretrained() / push_to_hub())"
)


class CorruptedDownloadError(HeadFolderError):
    """A downloaded head file does not match the checksum the Hub advertised for it."""


def _where(repo_id: str, revision: str | None) -> str:
    return f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")


def download_head(
    repo_id: str,
    revision: str | None = None,
    token: bool | str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Path:
    """Download (or read from the cache) the head files of a Hub repo, checked, and return their folder.

    Raises the client's `RepositoryNotFoundError` / `RevisionNotFoundError` / `LocalEntryNotFoundError` with the
    repo id in the message; `HeadFolderError` when the repo holds something else than a head (a PEFT adapter, a
    plain model); `CorruptedDownloadError` when a file fails its checksum (the bad cache entry is removed, so
    the next call downloads it again). `local_files_only=True` or `HF_HUB_OFFLINE=1` read only the cache.
    """
    where = _where(repo_id, revision)
    try:
        folder = Path(snapshot_download(
            repo_id, revision=revision, allow_patterns=list(HEAD_REPO_PATTERNS), token=token,
            cache_dir=cache_dir, local_files_only=local_files_only, force_download=force_download,
        ))
    except RevisionNotFoundError as err:
        raise _with_message(err, f"Revision {revision!r} not found in the Hub repo {repo_id!r}: no branch, tag or "
                                 "commit of that name. List them with HfApi().list_repo_refs().") from err
    except RepositoryNotFoundError as err:
        message = (f"Hub repo {repo_id!r} not found (or private and the token does not give access to it). "
                   "Check the id, or pass token=. It is not a local folder either.")
        raise _with_message(err, message) from err
    except LocalEntryNotFoundError as err:
        raise LocalEntryNotFoundError(
            f"The head {where} is not in the local cache and downloads are disabled (local_files_only=True or "
            "HF_HUB_OFFLINE=1). Download it once online, or give the path of a saved head folder."
        ) from err
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code == 401:
            raise _with_message(err, f"The Hub refused the token while reading {where} (401: invalid "
                                     "credentials). Pass a valid token= or log in with `hf auth login`.") from err
        raise
    check_head_files(folder, repo_id, revision, token=token, offline=local_files_only or constants.HF_HUB_OFFLINE)
    return folder


def _with_message(err: HfHubHTTPError, message: str) -> HfHubHTTPError:
    """The same client exception type, with our message (falls back to the original when it can't be rebuilt)."""
    try:
        return type(err)(message, response=err.response)
    except Exception:  # pragma: no cover - a client version with another constructor
        return err


def check_head_files(
    folder: Path, repo_id: str, revision: str | None, token: bool | str | None = None, offline: bool = False
) -> None:
    """Raise unless `folder` (a snapshot) holds an intact head: right config type, weights, good checksums."""
    problem = None
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        problem = f"no {CONFIG_NAME}"
    else:
        try:
            model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            model_type = "<unreadable>"
        if model_type != MODEL_TYPE:
            problem = f"{CONFIG_NAME} with model_type={model_type!r}"
        elif not (folder / WEIGHTS_NAME).is_file():
            problem = f"a head config but no {WEIGHTS_NAME}"
    if problem is not None:
        files = _repo_files(folder, repo_id, revision, token, offline)
        raise HeadFolderError(
            f"The Hub repo {_where(repo_id, revision)} is not a retrieval head: it holds "
            f"{describe_files(files, problem)} (files: {', '.join(files) or 'none'}). "
            f"Expected {EXPECTED}.{_hint(files)}"
        )
    for name in HEAD_REPO_FILES:
        verify_cached_file(folder / name, repo_id, revision)


def _repo_files(folder: Path, repo_id: str, revision: str | None, token: bool | str | None, offline: bool) -> list[str]:
    if not offline:
        try:
            return sorted(HfApi().list_repo_files(repo_id, revision=revision, token=token))
        except Exception:  # listing is only for the message
            pass
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def describe_files(files: list[str], problem: str) -> str:
    """What a repo's file list looks like: a PEFT adapter, a sentence-transformers model, a plain model..."""
    names = {Path(f).name for f in files}
    if problem.startswith("a head config"):
        return problem
    if "adapter_config.json" in names:
        return "a PEFT adapter (adapter_config.json)"
    if MODULES_NAME in names:
        return f"a sentence-transformers model ({problem})"
    if CONFIG_NAME in names and any(n.endswith((".safetensors", ".bin", ".gguf")) for n in names):
        return f"a plain model ({problem}, model weights)"
    return problem


def _hint(files: list[str]) -> str:
    names = {Path(f).name for f in files}
    if "adapter_config.json" in names:
        return " Load a PEFT adapter with peft.PeftModel.from_pretrained(base, repo_id)."
    if CONFIG_NAME in names:
        return (" To give this model an encode(), attach a new head: get_retrieval_model(AutoModelForCausalLM."
                "from_pretrained(repo_id), RetrievalHeadConfig(...)) and train it.")
    return ""


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def verify_cached_file(path: Path, repo_id: str, revision: str | None) -> None:
    """Check a snapshot file against the name of its cache blob (sha256 for LFS files, git sha1 otherwise).

    huggingface_hub only checks a download's size, so same-size garbage lands in the cache under the advertised
    checksum. On a mismatch the blob and its snapshot link are deleted and `CorruptedDownloadError` is raised.
    """
    if not path.is_symlink():  # not in the cache (or a cache without symlinks): nothing to compare with
        return
    blob = path.resolve()
    expected = blob.name
    if len(expected) == 64:
        digest = hashlib.sha256()
        with blob.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        actual = digest.hexdigest()
    elif len(expected) == 40:
        actual = _git_blob_sha1(blob.read_bytes())
    else:
        return
    if actual == expected:
        return
    blob.unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    raise CorruptedDownloadError(
        f"{path.name} downloaded from {_where(repo_id, revision)} is corrupted: its checksum is {actual}, the Hub "
        f"advertised {expected}. The bad file was removed from the cache; load again to re-download it, and if "
        "this repeats the file in the repo (or a proxy) is damaged."
    )


def read_remote_card(repo_id: str, revision: str | None = None, token: bool | str | None = None) -> str | None:
    """The README.md on the repo (at `revision`), or None when there is none (or the branch is new)."""
    try:
        return Path(hf_hub_download(repo_id, CARD_NAME, revision=revision, token=token)).read_text(encoding="utf-8")
    except (EntryNotFoundError, RevisionNotFoundError):
        return None


def push_head(
    model: RetrievalModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    exist_ok: bool = True,
    overwrite_card: bool = False,
) -> CommitInfo:
    """Create the repo if needed and upload the head's files in one commit; returns the `CommitInfo`.

    The card is rendered for `repo_id` and merged into the README already on the repo (text outside our
    section and the user's metadata keys kept) unless `overwrite_card=True`. `private` only applies when the
    repo is created. A wrong token fails at `create_repo`, before anything is uploaded.
    """
    from retrieval_head.io.save import write_head_folder

    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=exist_ok).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    existing = None if overwrite_card else read_remote_card(repo_id, revision, token)
    with tempfile.TemporaryDirectory(prefix="retrieval-head-push-") as tmp:
        folder = write_head_folder(
            model, Path(tmp) / "head", repo_id=repo_id, existing_card=existing, overwrite_card=overwrite_card
        )
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, allow_patterns=list(HEAD_REPO_PATTERNS),
            commit_message=commit_message or "Upload retrieval head", commit_description=commit_description,
            token=token, revision=revision, create_pr=create_pr,
        )
