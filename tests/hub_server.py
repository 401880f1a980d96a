"""A small Hugging Face Hub-protocol server for tests, built on the standard library only.

It speaks enough of the Hub's HTTP API for the stock ``huggingface_hub`` client (``HF_HUB_DISABLE_XET=1``)
and for ``transformers``' ``from_pretrained``: repos with commits, branches and tags, private repos behind
fixed tokens, uploads (regular files and basic-transfer LFS), downloads with ``Range``/``HEAD``, tree and ref
listings, and the ``X-Error-Code`` headers from which the client builds its exceptions. State lives in memory.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_TOKENS: Mapping[str, str] = {"hf_alice": "alice", "hf_bob": "bob"}
"""Token -> user name; a request with any other bearer token gets 401."""

LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lz4", "*.mlmodel",
    "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl",
    "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
    "*.zst", "*tfevents*",
)  # fmt: skip
"""File patterns stored through LFS, as in the ``.gitattributes`` the Hub writes into every new repo."""

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
"""Files at least this large (or with a NUL byte in their sample) go to LFS whatever their name."""

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
"""The Hub's message for a bad token: the client then raises a plain 401, not RepositoryNotFoundError."""

_TYPE_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob (what the Hub reports as ``oid`` for a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HubError(Exception):
    """An error answer: HTTP status, optional ``X-Error-Code`` and a message."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit; its bytes live in the server's blob store under ``blob_key``."""

    blob_key: str
    size: int
    oid: str
    sha256: str | None = None

    @property
    def pointer_size(self) -> int:
        """Size of the LFS pointer file (LFS files only)."""
        assert self.sha256 is not None
        return len(lfs_pointer(self.sha256, self.size))

    def tree_entry(self, path: str) -> dict[str, Any]:
        """The entry the ``tree`` and ``paths-info`` endpoints return."""
        entry: dict[str, Any] = {"type": "file", "oid": self.oid, "size": self.size, "path": path}
        if self.sha256 is not None:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry

    def sibling(self, path: str, blobs: bool) -> dict[str, Any]:
        """The entry of ``siblings`` in repo info (with sizes and LFS info when ``blobs`` is asked for)."""
        entry: dict[str, Any] = {"rfilename": path}
        if blobs:
            entry.update(size=self.size, blobId=self.oid)
            if self.sha256 is not None:
                entry["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry


@dataclass(frozen=True)
class Commit:
    """An immutable snapshot: the full file map plus metadata."""

    sha: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: Mapping[str, StoredFile]

    def as_json(self) -> dict[str, Any]:
        """The entry of the ``commits`` listing."""
        return {
            "id": self.sha,
            "title": self.title,
            "message": self.message,
            "authors": [{"user": self.author}],
            "date": self.date,
        }


@dataclass
class Repo:
    """A repository: commits by sha, branches and tags by name."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def owner(self) -> str:
        """The namespace, which is also the only user allowed to write."""
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> Commit:
        """Branch, tag or full commit sha -> commit, or 404 RevisionNotFound."""
        name = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
        sha = (
            self.branches.get(name) or self.tags.get(name) or (revision if revision in self.commits else None)
        )
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[sha]


@dataclass
class Response:
    """What a route returns; the handler writes it (omitting the body for HEAD)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        """A JSON answer."""
        return cls(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


class HubState:
    """All repositories and stored objects, behind one lock."""

    def __init__(self, tokens: Mapping[str, str]):
        self.tokens = dict(tokens)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.lock = threading.RLock()
        self._counter = 0

    def user_for(self, authorization: str | None) -> str | None:
        """The user behind an ``Authorization`` header; None if anonymous, 401 for an unknown token."""
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, INVALID_CREDENTIALS, headers={"X-Error-Message": INVALID_CREDENTIALS})
        return self.tokens[token]

    def readable(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        """The repo if it exists and ``user`` may see it, else 404 RepoNotFound (private repos included)."""
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def writable(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        """The repo if ``user`` may push to it: anonymous -> 403, invisible -> 404, not the owner -> 403."""
        if user is None:
            raise HubError(403, "You must be authenticated to write to a repository")
        repo = self.readable(repo_type, repo_id, user)
        if user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def store(self, data: bytes) -> StoredFile:
        """Store a regular file's bytes."""
        oid = git_blob_sha1(data)
        self.blobs.setdefault(oid, data)
        return StoredFile(blob_key=oid, size=len(data), oid=oid)

    def lfs_file(self, sha256: str, size: int | None) -> StoredFile:
        """Reference an already uploaded LFS object."""
        data = self.blobs.get(sha256)
        if data is None or (size is not None and size != len(data)):
            raise HubError(422, f"LFS object {sha256} was not uploaded")
        return StoredFile(
            blob_key=sha256, size=len(data), oid=git_blob_sha1(lfs_pointer(sha256, len(data))), sha256=sha256
        )

    def add_commit(
        self, repo: Repo, branch: str, files: Mapping[str, StoredFile], title: str, message: str, author: str
    ) -> Commit:
        """Create a commit on top of ``branch`` (which may be new) and move the branch to it."""
        self._counter += 1
        parent = repo.branches.get(branch)
        seed = json.dumps(
            [
                repo.repo_id,
                parent,
                title,
                self._counter,
                time.time_ns(),
                sorted((p, f.oid) for p, f in files.items()),
            ]
        )
        commit = Commit(
            sha=hashlib.sha1(seed.encode()).hexdigest(),
            parent=parent,
            title=title,
            message=message,
            author=author,
            date=_now(),
            files=dict(files),
        )
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit


class HubServer:
    """The Hub server on 127.0.0.1, served from a background thread.

    ``HubServer(port=0)`` picks a free port; pass a reserved one when ``HF_ENDPOINT`` was set beforehand.
    Usable as a context manager. ``requests`` logs ``"METHOD /path"`` for every request served.
    """

    def __init__(self, port: int = 0, tokens: Mapping[str, str] = DEFAULT_TOKENS):
        self.state = HubState(tokens)
        self.requests: list[str] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The endpoint to use as ``HF_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubServer:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def corrupt(
        self,
        repo_id: str,
        path: str,
        data: bytes | None = None,
        *,
        revision: str = "main",
        repo_type: str = "model",
    ) -> None:
        """Replace the stored bytes of a file while it keeps advertising its old size, ETag and sha256.

        By default every byte is flipped, keeping the length: ``huggingface_hub`` only checks the downloaded
        size, so such a download succeeds and only a checksum (e.g. ``HfApi.verify_repo_checksums``) catches
        it. Pass shorter ``data`` to get the client's "Consistency check failed" size error instead. The blob
        store is content-addressed, so every file sharing these bytes (in any repo or commit) is affected.
        """
        with self.state.lock:
            stored = self.state.repos[(repo_type, repo_id)].resolve(revision).files[path]
            original = self.state.blobs[stored.blob_key]
            self.state.blobs[stored.blob_key] = bytes(b ^ 0xFF for b in original) if data is None else data


class _Handler(BaseHTTPRequestHandler):
    """Parses a request, dispatches it under the state lock, and writes the answer."""

    protocol_version = "HTTP/1.1"
    timeout = 60
    server_version = "TestHub/1.0"
    api_types: ClassVar[dict[str, str]] = {"models": "model", "datasets": "dataset", "spaces": "space"}

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet; ``HubServer.requests`` keeps the log."""

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined,no-any-return]

    def _read_body(self) -> bytes:
        """Read the whole request body (Content-Length or chunked), so keep-alive stays in sync."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, then the blank line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        body = self._read_body()
        url = urlsplit(self.path)
        self.hub.requests.append(f"{self.command} {url.path}")
        try:
            with self.hub.state.lock:
                user = self.hub.state.user_for(self.headers.get("Authorization"))
                response = self._route(url.path, parse_qs(url.query), body, user)
        except HubError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers.setdefault("X-Error-Message", err.message)
            response = Response.json({"error": err.message}, err.status, headers)
        self.send_response(response.status)
        for name, value in {"Content-Length": str(len(response.body)), **response.headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _route(self, path: str, query: dict[str, list[str]], body: bytes, user: str | None) -> Response:
        """Dispatch on the path: ``/api/...``, the LFS upload target, ``.git/info/lfs`` and ``resolve``."""
        parts = [unquote(p) for p in path.split("/")[1:]]
        method = self.command
        if parts[:1] == ["api"]:
            if parts[1:] == ["whoami-v2"] and method == "GET":
                return self._whoami(user)
            if parts[1:] == ["validate-yaml"] and method == "POST":
                return Response.json({"errors": [], "warnings": []})
            if parts[1:] == ["repos", "create"] and method == "POST":
                return self._create_repo(_json(body), user)
            if parts[1:] == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo(_json(body), user)
            if len(parts) >= 4 and parts[1] in self.api_types:
                return self._repo_api(
                    self.api_types[parts[1]], f"{parts[2]}/{parts[3]}", parts[4:], query, body, user
                )
        elif parts[:1] == ["lfs-objects"] and len(parts) == 2 and method == "PUT":
            return self._lfs_put(parts[1], body)
        else:
            repo_type = {"datasets": "dataset", "spaces": "space"}.get(parts[0], "model")
            rest = parts[1:] if repo_type != "model" else parts
            if (
                len(rest) == 6
                and rest[1].endswith(".git")
                and rest[2:] == ["info", "lfs", "objects", "batch"]
            ):
                return self._lfs_batch(
                    repo_type, f"{rest[0]}/{rest[1].removesuffix('.git')}", _json(body), user
                )
            if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
                repo = self.hub.state.readable(repo_type, f"{rest[0]}/{rest[1]}", user)
                return self._resolve(repo, rest[3], "/".join(rest[4:]))
        raise HubError(404, f"Not found: {method} {path}")

    def _whoami(self, user: str | None) -> Response:
        if user is None:
            raise HubError(401, "You must be authenticated")
        return Response.json(
            {
                "type": "user",
                "name": user,
                "fullname": user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _create_repo(self, payload: dict[str, Any], user: str | None) -> Response:
        if user is None:
            raise HubError(403, "You must be authenticated to create a repository")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        url = f"{self.hub.url}/{_TYPE_PREFIX[repo_type]}{repo_id}"
        if payload.get("organization") not in (None, user):
            raise HubError(403, f"You cannot create a repository in {payload['organization']}")
        state = self.hub.state
        if (repo_type, repo_id) in state.repos:
            return Response.json({"error": "You already created this repo", "url": url}, 409)
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        repo = state.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private, _now())
        gitattributes = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
        state.add_commit(
            repo, "main", {".gitattributes": state.store(gitattributes)}, "initial commit", "", user
        )
        return Response.json({"url": url, "name": repo_id})

    def _delete_repo(self, payload: dict[str, Any], user: str | None) -> Response:
        repo_type = payload.get("type") or "model"
        repo = self.hub.state.writable(
            repo_type, f"{payload.get('organization') or user}/{payload['name']}", user
        )
        del self.hub.state.repos[(repo_type, repo.repo_id)]
        return Response.json({})

    def _repo_api(
        self,
        repo_type: str,
        repo_id: str,
        rest: list[str],
        query: dict[str, list[str]],
        body: bytes,
        user: str | None,
    ) -> Response:
        """``/api/{type}s/{ns}/{name}/...``."""
        state, method = self.hub.state, self.command
        action, args = (rest[0], rest[1:]) if rest else ("", [])
        if method == "GET":
            repo = state.readable(repo_type, repo_id, user)
            if not rest or (action == "revision" and len(args) == 1):
                return self._repo_info(repo, args[0] if args else "main", _flag(query, "blobs"))
            if action == "tree" and args:
                return self._tree(repo.resolve(args[0]), "/".join(args[1:]), _flag(query, "recursive"))
            if action == "refs" and not args:
                return self._refs(repo)
            if action == "commits" and len(args) == 1:
                return self._commits(repo, repo.resolve(args[0]))
        elif method == "POST" and action == "paths-info" and len(args) == 1:
            commit = state.readable(repo_type, repo_id, user).resolve(args[0])
            paths = parse_qs(body.decode()).get("paths", [])
            return Response.json([entry for p in paths if (entry := _path_entry(commit, p)) is not None])
        elif len(args) == 1 and (action, method) in {
            ("preupload", "POST"),
            ("commit", "POST"),
            ("tag", "POST"),
            ("tag", "DELETE"),
            ("branch", "POST"),
            ("branch", "DELETE"),
        }:
            repo = state.writable(repo_type, repo_id, user)
            assert user is not None
            if action == "preupload":
                return self._preupload(repo, args[0], _json(body))
            if action == "commit":
                return self._commit(repo, args[0], body, user)
            if method == "DELETE":
                refs = repo.tags if action == "tag" else repo.branches
                if args[0] not in refs or args[0] == "main":
                    raise HubError(404, f"Invalid rev id: {args[0]}", "RevisionNotFound")
                del refs[args[0]]
                return Response.json({})
            return self._create_ref(repo, action, args[0], _json(body))
        raise HubError(404, f"Not found: {method} /api/{repo_type}s/{repo_id}/{'/'.join(rest)}")

    def _repo_info(self, repo: Repo, revision: str, blobs: bool) -> Response:
        commit = repo.resolve(revision)
        return Response.json(
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "author": repo.owner,
                "sha": commit.sha,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": [f.sibling(p, blobs) for p, f in sorted(commit.files.items())],
            }
        )

    def _tree(self, commit: Commit, prefix: str, recursive: bool) -> Response:
        prefix = prefix.strip("/")
        base = f"{prefix}/" if prefix else ""
        below = {p: f for p, f in commit.files.items() if p.startswith(base)}
        if prefix and not below:
            raise HubError(404, f"{prefix} does not exist", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        folders: set[str] = set()
        entries = []
        for path, stored in sorted(below.items()):
            parts = path[len(base) :].split("/")
            depth = len(parts) - 1 if recursive else min(1, len(parts) - 1)
            folders.update(base + "/".join(parts[: i + 1]) for i in range(depth))
            if recursive or len(parts) == 1:
                entries.append(stored.tree_entry(path))
        return Response.json([_folder_entry(commit, f) for f in sorted(folders)] + entries)

    def _refs(self, repo: Repo) -> Response:
        def ref(kind: str, name: str, sha: str) -> dict[str, str]:
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}

        return Response.json(
            {
                "branches": [ref("heads", n, s) for n, s in sorted(repo.branches.items())],
                "converts": [],
                "tags": [ref("tags", n, s) for n, s in sorted(repo.tags.items())],
                "pullRequests": [],
            }
        )

    def _commits(self, repo: Repo, commit: Commit) -> Response:
        history = [commit.as_json()]
        while commit.parent is not None:
            commit = repo.commits[commit.parent]
            history.append(commit.as_json())
        return Response.json(history)

    def _preupload(self, repo: Repo, revision: str, payload: dict[str, Any]) -> Response:
        head = repo.resolve(revision)
        files = []
        for item in payload.get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            lfs = (
                any(fnmatch.fnmatch(item["path"].rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)
                or item.get("size", 0) >= LFS_SIZE_THRESHOLD
                or b"\0" in sample
            )
            remote = head.files.get(item["path"])
            oid = None if remote is None else (remote.sha256 or remote.oid)
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return Response.json({"files": files, "commitOid": head.sha})

    def _commit(self, repo: Repo, branch: str, body: bytes, user: str) -> Response:
        state = self.hub.state
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, repo.branches[branch]):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[repo.branches[branch]].files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                files[path] = state.store(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                files[path] = state.lfs_file(value["oid"], value.get("size"))
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                files = {p: f for p, f in files.items() if not p.startswith(path.rstrip("/") + "/")}
            else:
                raise HubError(400, f"Unknown commit operation: {key}")
        commit = state.add_commit(
            repo, branch, files, header.get("summary", ""), header.get("description", ""), user
        )
        url = f"{self.hub.url}/{_TYPE_PREFIX[repo.repo_type]}{repo.repo_id}"
        return Response.json(
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{url}/commit/{commit.sha}",
                "commitMessage": commit.title,
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _create_ref(self, repo: Repo, kind: str, name: str, payload: dict[str, Any]) -> Response:
        """``POST .../tag/{revision}`` (the tag name is in the body) and ``POST .../branch/{branch}``."""
        if kind == "tag":
            name, target = payload["tag"], repo.resolve(name)
            refs = repo.tags
        else:
            target, refs = repo.resolve(payload.get("startingPoint") or "main"), repo.branches
        if name in repo.tags or name in repo.branches:
            raise HubError(409, f"Reference already exists: {name}")
        refs[name] = target.sha
        return Response.json({})

    def _lfs_batch(self, repo_type: str, repo_id: str, payload: dict[str, Any], user: str | None) -> Response:
        """The git-lfs batch API, basic transfer: a PUT target for each object the store lacks."""
        if payload.get("operation") == "upload":
            self.hub.state.writable(repo_type, repo_id, user)
        else:
            self.hub.state.readable(repo_type, repo_id, user)
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.state.blobs:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-objects/{obj['oid']}", "header": {}}
                }
            objects.append(entry)
        return Response.json(
            {"transfer": "basic", "objects": objects}, 200, {"Content-Type": "application/vnd.git-lfs+json"}
        )

    def _lfs_put(self, oid: str, body: bytes) -> Response:
        """The upload target: content-addressed, so the sha256 is the only check needed."""
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match its sha256")
        self.hub.state.blobs.setdefault(oid, body)
        return Response(200)

    def _resolve(self, repo: Repo, revision: str, path: str) -> Response:
        """``/resolve/{rev}/{path}``: the file with the headers the client reads, honouring ``Range``."""
        commit = repo.resolve(revision)
        stored = commit.files.get(path)
        if stored is None:
            raise HubError(404, f"{path} does not exist", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        data = self.hub.state.blobs[stored.blob_key]
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{stored.oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if stored.sha256 is not None:
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(stored.size)})
        byte_range = self.headers.get("Range")
        if byte_range is None:
            return Response(200, data, headers)
        start, end = _parse_range(byte_range, len(data))
        if start >= len(data) or start > end:
            raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return Response(206, data[start : end + 1], headers)


def _json(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body or b"{}")
    except ValueError as err:
        raise HubError(400, f"Invalid JSON body: {err}") from err
    if not isinstance(payload, dict):
        raise HubError(400, "Expected a JSON object")
    return payload


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, [""])[0].lower() in ("1", "true")


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` -> inclusive (start, end); only one range is supported."""
    first, _, last = header.removeprefix("bytes=").split(",")[0].strip().partition("-")
    try:
        if not first:
            return max(size - int(last), 0), size - 1
        return int(first), (min(int(last), size - 1) if last else size - 1)
    except ValueError as err:
        raise HubError(416, f"Bad Range header: {header}") from err


def _folder_entry(commit: Commit, folder: str) -> dict[str, Any]:
    children = sorted(f"{p}:{f.oid}" for p, f in commit.files.items() if p.startswith(folder + "/"))
    return {
        "type": "directory",
        "oid": hashlib.sha1("\n".join(children).encode()).hexdigest(),
        "size": 0,
        "path": folder,
    }


def _path_entry(commit: Commit, path: str) -> dict[str, Any] | None:
    """``paths-info`` entry for a file or folder; None when the path does not exist."""
    path = path.strip("/")
    if path in commit.files:
        return commit.files[path].tree_entry(path)
    if any(p.startswith(path + "/") for p in commit.files):
        return _folder_entry(commit, path)
    return None
