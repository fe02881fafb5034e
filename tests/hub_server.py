"""A local, Hugging Face Hub-compatible HTTP server for the test-suite.

``LocalHub`` speaks enough of the Hub's HTTP API for ``huggingface_hub`` (2.4) and ``transformers``
to round-trip over real HTTP against ``127.0.0.1``:

- ``GET  /api/whoami-v2``
- ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``POST /api/repos/move``
- ``POST /api/validate-yaml`` (README.md metadata check done by ``create_commit``)
- ``GET  /api/{models,datasets,spaces}/{repo_id}[/revision/{rev}]`` (repo info)
- ``POST /api/{type}s/{repo_id}/preupload/{rev}`` ("regular" mode, or "lfs" above ``lfs_threshold``)
- ``POST /api/{type}s/{repo_id}/commit/{rev}`` (NDJSON: header, file, lfsFile, deletedFile, deletedFolder;
  ``create_pr=1`` opens ``refs/pr/N``)
- ``GET  /api/{type}s/{repo_id}/tree/{rev}[/{path}]`` (``recursive``, ``expand``)
- ``POST /api/{type}s/{repo_id}/paths-info/{rev}``
- ``GET  /api/{type}s/{repo_id}/refs``, ``GET /api/{type}s/{repo_id}/commits/{rev}``
- ``POST|DELETE /api/{type}s/{repo_id}/branch/{branch}``, ``POST /api/{type}s/{repo_id}/tag/{rev}``,
  ``DELETE /api/{type}s/{repo_id}/tag/{tag}``, ``PUT /api/{type}s/{repo_id}/settings``
- ``HEAD|GET /[{datasets,spaces}/]{repo_id}/resolve/{rev}/{path}`` (``X-Repo-Commit``, ``ETag``,
  ``Content-Length``, ``Range``; never any Xet header)
- Git LFS: ``POST /[{type}s/]{repo_id}.git/info/lfs/objects/batch`` + ``PUT``/verify targets on this server.

Everything else answers 404 and is logged loudly (``LocalHub.unknown_routes``).

Storage is in memory: every commit keeps an immutable ``{path: blob}`` mapping, so any commit sha can be read
back and a commit is published with a single dictionary assignment under a lock (atomic: a failed commit
leaves the repository exactly as it was).

Auth: requests carry ``Authorization: Bearer <token>``. A wrong token is answered 401 everywhere (as on the
Hub, ``X-Error-Message: Invalid credentials in Authorization header``); write endpoints also need a token
(401 without one), and a *write* token (tokens in ``read_tokens`` get 403). Writes to repos matching
``forbidden_repos`` (fnmatch patterns, e.g. ``"org/*"``) get 403. Unknown repos get 404 with
``X-Error-Code: RepoNotFound``. Private repos are invisible (401 + ``RepoNotFound``) without a valid token.

Fault injection: ``hub.fail_next_commit = 500`` (or ``hub.inject_fault("commit", 500, times=3)``) makes the
next commit(s) fail *after* the payload has been parsed and the new tree built, right before it would have
been published.

Standard library only.
"""

from __future__ import annotations

import base64
import datetime as _dt
import fnmatch
import hashlib
import json
import logging
import re
import secrets
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qs, quote, unquote, urlsplit


__all__ = ["LocalHub", "HubRequest", "LFS_POINTER_TEMPLATE", "git_blob_sha1"]

logger = logging.getLogger("tests.hub_server")

# Plural URL segment <-> repo type.
_TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PLURAL_FROM_TYPE = {v: k for k, v in _TYPE_FROM_PLURAL.items()}
# Prefix of web / resolve URLs per repo type (models have none).
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Sub-routes that may follow a repo id in /api/{type}s/{repo_id}/... URLs.
_API_SUBROUTES = {
    "revision",
    "preupload",
    "commit",
    "tree",
    "paths-info",
    "refs",
    "commits",
    "branch",
    "tag",
    "settings",
    "resolve",
}
_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX_PREFIX = re.compile(r"[0-9a-f]{7,39}")

LFS_POINTER_TEMPLATE = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"

DEFAULT_GITATTRIBUTES = (
    "*.7z filter=lfs diff=lfs merge=lfs -text\n"
    "*.bin filter=lfs diff=lfs merge=lfs -text\n"
    "*.ckpt filter=lfs diff=lfs merge=lfs -text\n"
    "*.gguf filter=lfs diff=lfs merge=lfs -text\n"
    "*.h5 filter=lfs diff=lfs merge=lfs -text\n"
    "*.msgpack filter=lfs diff=lfs merge=lfs -text\n"
    "*.npy filter=lfs diff=lfs merge=lfs -text\n"
    "*.onnx filter=lfs diff=lfs merge=lfs -text\n"
    "*.parquet filter=lfs diff=lfs merge=lfs -text\n"
    "*.pt filter=lfs diff=lfs merge=lfs -text\n"
    "*.pth filter=lfs diff=lfs merge=lfs -text\n"
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    "*.tar.* filter=lfs diff=lfs merge=lfs -text\n"
    "*.zip filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob (what ``git hash-object`` prints), as the Hub reports for regular files."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _iso(d: _dt.datetime) -> str:
    # The format huggingface_hub's `parse_datetime` expects: '%Y-%m-%dT%H:%M:%S.%fZ' (milliseconds).
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


# --------------------------------------------------------------------------------------------------------------
# Storage model
# --------------------------------------------------------------------------------------------------------------


class _Blob:
    """Immutable file content. ``lfs`` blobs are reported with LFS metadata (tree, resolve headers)."""

    __slots__ = ("data", "lfs", "sha256", "oid", "pointer_size")

    def __init__(self, data: bytes, lfs: bool = False) -> None:
        self.data = bytes(data)
        self.lfs = bool(lfs)
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        if self.lfs:
            pointer = LFS_POINTER_TEMPLATE.format(oid=self.sha256, size=len(self.data)).encode()
            self.oid = git_blob_sha1(pointer)  # git oid of the pointer file, as on the Hub
            self.pointer_size = len(pointer)
        else:
            self.oid = git_blob_sha1(self.data)
            self.pointer_size = 0

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def etag(self) -> str:
        # Hub: git sha1 for regular files, sha256 for LFS files.
        return self.sha256 if self.lfs else self.oid


@dataclass(frozen=True)
class _Commit:
    oid: str
    parents: tuple[str, ...]
    title: str
    message: str
    author: str
    date: _dt.datetime
    files: Mapping[str, _Blob]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: _dt.datetime
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    tags: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    prs: dict[int, str] = field(default_factory=dict)  # number -> commit oid (refs/pr/N)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:24])

    def resolve(self, revision: str) -> str | None:
        """Commit oid for a branch / tag / ``refs/pr/N`` / ``refs/heads/x`` / full or abbreviated sha."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if revision.startswith("refs/heads/") and revision[len("refs/heads/") :] in self.branches:
            return self.branches[revision[len("refs/heads/") :]]
        if revision.startswith("refs/tags/") and revision[len("refs/tags/") :] in self.tags:
            return self.tags[revision[len("refs/tags/") :]]
        m = re.fullmatch(r"refs/pr/(\d+)", revision)
        if m:
            return self.prs.get(int(m.group(1)))
        if _HEX40.fullmatch(revision):
            return revision if revision in self.commits else None
        if _HEX_PREFIX.fullmatch(revision):
            matches = [oid for oid in self.commits if oid.startswith(revision)]
            return matches[0] if len(matches) == 1 else None
        return None

    def writable_ref(self, revision: str) -> tuple[str, Any] | None:
        """('branch', name) or ('pr', number) for a revision that can receive commits, else None."""
        if revision.startswith("refs/heads/"):
            revision = revision[len("refs/heads/") :]
        if revision in self.branches:
            return ("branch", revision)
        m = re.fullmatch(r"refs/pr/(\d+)", revision)
        if m and int(m.group(1)) in self.prs:
            return ("pr", int(m.group(1)))
        return None

    def history(self, oid: str) -> list[_Commit]:
        """First-parent history from ``oid``, newest first."""
        out = []
        cur: str | None = oid
        while cur is not None:
            commit = self.commits[cur]
            out.append(commit)
            cur = commit.parents[0] if commit.parents else None
        return out


@dataclass(frozen=True)
class HubRequest:
    """One request as seen by the server (for assertions in tests)."""

    method: str
    path: str  # raw path, without the query string
    query: str
    status: int
    authorized: bool  # whether a valid token was sent


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


@dataclass
class _Fault:
    status: int
    times: int
    message: str


# --------------------------------------------------------------------------------------------------------------
# The hub
# --------------------------------------------------------------------------------------------------------------


class LocalHub:
    """A Hugging Face Hub-compatible HTTP server on ``127.0.0.1`` (background thread), for tests.

    Args:
        token: the valid *write* token (``Authorization: Bearer <token>``).
        username: the user ``token`` belongs to (``whoami``; namespace of repos created without one).
        orgs: organisations reported by ``whoami``.
        read_tokens: extra valid tokens that may only read (writes -> 403).
        forbidden_repos: repo ids (fnmatch patterns allowed, e.g. ``"org/*"``) for which writes -> 403.
        lfs_threshold: files of at least this many bytes are uploaded through Git LFS (batch API + PUT to this
            server). ``None`` (default): by size, every file is "regular" (base64 inside the commit payload).
        lfs_patterns: fnmatch patterns (matched on the path and on the file name) always uploaded through LFS.
            Default ``("*.parquet", "*.arrow")``: ``datasets.push_to_hub`` pre-uploads its parquet shards with
            ``preupload_lfs_files`` and deletes the temporary files before committing, so they must be LFS
            (a "regular" shard would be read again at commit time -> FileNotFoundError). ``()``: never by name.
        init_gitattributes: like the Hub, a new repo starts with an "initial commit" holding ``.gitattributes``.
        host, port: bind address (``port=0``: a free port).
    """

    def __init__(
        self,
        token: str = "hf_test_token",
        *,
        username: str = "test-user",
        orgs: Iterable[str] = ("test-org",),
        read_tokens: Iterable[str] = (),
        forbidden_repos: Iterable[str] = (),
        lfs_threshold: int | None = None,
        lfs_patterns: Iterable[str] = ("*.parquet", "*.arrow"),
        init_gitattributes: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.token = token
        self.username = username
        self.orgs = list(orgs)
        self.read_tokens = set(read_tokens)
        self.forbidden_repos: set[str] = set(forbidden_repos)
        self.lfs_threshold = lfs_threshold
        self.lfs_patterns: list[str] = list(lfs_patterns)
        self.init_gitattributes = init_gitattributes
        self._host = host
        self._port = port

        self.requests: list[HubRequest] = []
        self.unknown_routes: list[str] = []
        self.server_errors: list[str] = []

        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lfs_objects: dict[str, bytes] = {}  # sha256 -> content (uploaded through the LFS PUT target)
        self._faults: dict[str, _Fault] = {}
        self._commit_counter = 0
        self._lfs_secret = secrets.token_hex(8)

        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()

    # ----------------------------------------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def endpoint(self) -> str:  # alias
        return self.url

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> "LocalHub":
        if self._server is not None:
            return self
        server = _Server((self._host, self._port), _Handler)
        server.hub = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"LocalHub:{self.url}", daemon=True
        )
        self._thread.start()
        logger.debug("LocalHub listening on %s", self.url)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()  # stop accepting (serve_forever returns)
        # Kick out keep-alive connections still parked in their handler threads.
        with self._conn_lock:
            conns = list(self._connections)
            self._connections.clear()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "stopped"
        return f"LocalHub({where}, repos={len(self._repos)})"

    # ---------------------------------------------------------------------------------------- fault injection

    def inject_fault(self, route: str, status: int = 500, times: int = 1, message: str | None = None) -> None:
        """Make the next ``times`` requests to ``route`` fail with ``status``.

        ``route`` is one of: ``"commit"``, ``"preupload"``, ``"create"``, ``"info"``, ``"tree"``, ``"resolve"``,
        ``"lfs"`` (batch + upload), ``"whoami"``, ``"paths-info"``, ``"*"`` (any request). A commit fault fires
        after the payload is parsed and the new tree is built, right before publishing: the repo is unchanged.
        """
        with self._lock:
            if times <= 0:
                self._faults.pop(route, None)
            else:
                self._faults[route] = _Fault(status=status, times=times, message=message or f"Injected HTTP {status}")

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def fail_next_commit(self) -> int | None:
        fault = self._faults.get("commit")
        return fault.status if fault is not None else None

    @fail_next_commit.setter
    def fail_next_commit(self, status: int | None) -> None:
        if status is None:
            self.inject_fault("commit", times=0)
        else:
            self.inject_fault("commit", status=int(status), times=1)

    def _take_fault(self, route: str) -> _Fault | None:
        with self._lock:
            for key in (route, "*"):
                fault = self._faults.get(key)
                if fault is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        del self._faults[key]
                    return fault
        return None

    def _maybe_fail(self, route: str) -> None:
        fault = self._take_fault(route)
        if fault is not None:
            raise _HTTPError(fault.status, fault.message)

    # ------------------------------------------------------------------------ direct (server-side) helpers

    def create_repo(
        self, repo_id: str, *, repo_type: str = "model", private: bool = False, exist_ok: bool = False
    ) -> None:
        """Create a repo directly (no HTTP), e.g. to seed a test."""
        repo_type = repo_type or "model"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                if exist_ok:
                    return
                raise ValueError(f"{repo_type} repo {repo_id} already exists")
            self._new_repo(repo_type, repo_id, private)

    def upload_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | Path],
        *,
        repo_type: str = "model",
        revision: str = "main",
        message: str = "Upload files",
        delete: Iterable[str] = (),
        lfs: bool = False,
    ) -> str:
        """Commit ``files`` (path_in_repo -> bytes / text / local Path) directly; creates the repo if needed.
        Returns the new commit sha."""
        repo_type = repo_type or "model"
        with self._lock:
            repo = self._repos.get((repo_type, repo_id)) or self._new_repo(repo_type, repo_id, False)
            ref = repo.writable_ref(revision)
            if ref is None:
                raise ValueError(f"{revision!r} is not a branch of {repo_id}")
            parent = self._ref_oid(repo, ref)
            tree = dict(repo.commits[parent].files)
            for path in delete:
                tree.pop(path, None)
            for path, content in files.items():
                if isinstance(content, Path):
                    content = content.read_bytes()
                elif isinstance(content, str):
                    content = content.encode()
                tree[_clean_path(path)] = _Blob(content, lfs=lfs)
            return self._publish(repo, ref, parent, tree, message, "")

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        return (repo_type or "model", repo_id) in self._repos

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """``{path: content}`` of a repo at ``revision`` (server-side view)."""
        with self._lock:
            repo = self._repos[(repo_type or "model", repo_id)]
            oid = repo.resolve(revision)
            if oid is None:
                raise KeyError(f"revision {revision!r} not found in {repo_id}")
            return {path: blob.data for path, blob in repo.commits[oid].files.items()}

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        return sorted(self.files(repo_id, revision=revision, repo_type=repo_type))

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit sha that ``revision`` points to."""
        with self._lock:
            oid = self._repos[(repo_type or "model", repo_id)].resolve(revision)
            if oid is None:
                raise KeyError(f"revision {revision!r} not found in {repo_id}")
            return oid

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict[str, Any]]:
        """First-parent history, newest first: ``[{"oid", "title", "message", "files"}]``."""
        with self._lock:
            repo = self._repos[(repo_type or "model", repo_id)]
            oid = repo.resolve(revision)
            if oid is None:
                raise KeyError(f"revision {revision!r} not found in {repo_id}")
            return [
                {"oid": c.oid, "title": c.title, "message": c.message, "files": sorted(c.files)}
                for c in repo.history(oid)
            ]

    def requests_to(self, fragment: str, method: str | None = None) -> list[HubRequest]:
        """Recorded requests whose path contains ``fragment`` (optionally filtered by method)."""
        return [r for r in list(self.requests) if fragment in r.path and (method is None or r.method == method)]

    # ---------------------------------------------------------------------------------------------- internals

    def _new_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
        self._repos[(repo_type, repo_id)] = repo
        files: dict[str, _Blob] = {}
        if self.init_gitattributes:
            files[".gitattributes"] = _Blob(DEFAULT_GITATTRIBUTES.encode())
        oid = self._new_commit_oid(repo, (), "initial commit", files)
        repo.commits[oid] = _Commit(oid, (), "initial commit", "", self.username, _now(), files)
        repo.branches["main"] = oid
        return repo

    def _new_commit_oid(self, repo: _Repo, parents: tuple[str, ...], title: str, files: Mapping[str, _Blob]) -> str:
        self._commit_counter += 1
        h = hashlib.sha1()
        h.update(f"{repo.uid}\n{parents}\n{title}\n{self._commit_counter}\n{time.time_ns()}\n".encode())
        for path in sorted(files):
            h.update(f"{path}\0{files[path].oid}\n".encode())
        return h.hexdigest()

    @staticmethod
    def _ref_oid(repo: _Repo, ref: tuple[str, Any]) -> str:
        kind, name = ref
        return repo.branches[name] if kind == "branch" else repo.prs[name]

    def _publish(
        self, repo: _Repo, ref: tuple[str, Any], parent: str, tree: dict[str, _Blob], title: str, message: str
    ) -> str:
        """Atomically add a commit on top of ``parent`` and move ``ref`` to it (caller holds the lock)."""
        oid = self._new_commit_oid(repo, (parent,), title, tree)
        commit = _Commit(oid, (parent,), title, message, self.username, _now(), dict(tree))
        repo.commits[oid] = commit
        kind, name = ref
        if kind == "branch":
            repo.branches[name] = oid
        else:
            repo.prs[name] = oid
        return oid

    def _web_url(self, repo: _Repo) -> str:
        return f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _wants_lfs(self, path: str, size: int) -> bool:
        if size <= 0:
            return False  # huggingface_hub always sends empty files as "regular"
        if self.lfs_threshold is not None and size >= self.lfs_threshold:
            return True
        name = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(name, p) for p in self.lfs_patterns)

    def _writes_forbidden(self, repo_id: str) -> bool:
        return any(fnmatch.fnmatchcase(repo_id, pattern) for pattern in self.forbidden_repos)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: LocalHub

    def process_request(self, request, client_address):  # track live connections so stop() can close them
        with self.hub._conn_lock:
            self.hub._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.hub._conn_lock:
            self.hub._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, OSError)):
            return  # client went away / stop() closed the socket
        super().handle_error(request, client_address)


def _clean_path(path: str) -> str:
    """Validate a path in repo (relative, no '..', no empty segment)."""
    if not isinstance(path, str) or not path:
        raise _HTTPError(400, f"Invalid path: {path!r}")
    if path.startswith("/") or "\\" in path or "\0" in path:
        raise _HTTPError(400, f"Invalid path: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise _HTTPError(400, f"Invalid path: {path!r}")
    return path


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------------------------------
# Request handler
# --------------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub (httpx2 pools connections)
    server_version = "LocalHub/1.0"
    server: _Server

    # silence the default stderr access log
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    # ----------------------------------------------------------------------------------------------- plumbing

    @property
    def hub(self) -> LocalHub:
        return self.server.hub

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until empty line
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self._raw_path = split.path
        self._query_string = split.query
        self.query = parse_qs(split.query, keep_blank_values=True)
        self._authorized = False
        self._status = 0
        try:
            self.body = self._read_body()
        except Exception:  # malformed body: drop the connection
            self.close_connection = True
            return
        try:
            self._route()
        except _HTTPError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # bug in the server: say so loudly
            import traceback

            tb = traceback.format_exc()
            self.hub.server_errors.append(f"{self.command} {self.path}: {exc!r}")
            logger.error("LocalHub internal error on %s %s\n%s", self.command, self.path, tb)
            print(f"[LocalHub] INTERNAL ERROR on {self.command} {self.path}\n{tb}", file=sys.stderr)
            try:
                self._send_error(_HTTPError(500, f"LocalHub internal error: {exc!r}"))
            except OSError:
                self.close_connection = True
        finally:
            self.hub.requests.append(
                HubRequest(self.command, self._raw_path, self._query_string, self._status, self._authorized)
            )

    def _send(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
        content_length: int | None = None,
    ) -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.send_header("X-Request-Id", uuid.uuid4().hex)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _send_error(self, err: _HTTPError) -> None:
        headers = dict(err.headers)
        # header values must be latin-1; keep them on one line
        headers["X-Error-Message"] = err.message.replace("\n", " ").encode("latin-1", "replace").decode("latin-1")
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json({"error": err.message}, status=err.status, headers=headers)

    # -------------------------------------------------------------------------------------------------- auth

    def _token(self) -> str | None:
        """The valid token sent with the request, None if none was sent; 401 if an invalid one was sent."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token and (token == self.hub.token or token in self.hub.read_tokens):
            self._authorized = True
            return token
        raise _HTTPError(401, "Invalid credentials in Authorization header")

    def _require_write(self, repo_id: str | None = None) -> None:
        token = self._token()
        if token is None:
            raise _HTTPError(401, "Authentication required: send a valid 'Authorization: Bearer <token>' header")
        if token != self.hub.token:
            raise _HTTPError(403, "This token is read-only: it cannot be used for write operations")
        if repo_id is not None and self.hub._writes_forbidden(repo_id):
            raise _HTTPError(403, f"You don't have the rights to write to {repo_id} (forbidden on this LocalHub)")

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        """Repo visible to the requester; 404/401 RepoNotFound otherwise. Validates the token if one is sent."""
        token = self._token()
        repo = self.hub._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HTTPError(404, "Repository not found", code="RepoNotFound")
        if repo.private and token is None:
            raise _HTTPError(401, "Repository not found", code="RepoNotFound")
        return repo

    @staticmethod
    def _resolve(repo: _Repo, revision: str) -> str:
        oid = repo.resolve(revision)
        if oid is None:
            raise _HTTPError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return oid

    # ---------------------------------------------------------------------------------------------- routing

    def _route(self) -> None:
        segs = [unquote(s) for s in self._raw_path.split("/")[1:]]
        if segs and segs[-1] == "" and len(segs) > 1:
            segs = segs[:-1]
        method = self.command

        if segs[:1] == ["api"]:
            rest = segs[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo()
            if rest == ["repos", "move"] and method == "POST":
                return self._move_repo()
            if rest == ["validate-yaml"] and method == "POST":
                return self._send_json({"errors": [], "warnings": []})
            if len(rest) >= 2 and rest[0] in _TYPE_FROM_PLURAL:
                repo_type = _TYPE_FROM_PLURAL[rest[0]]
                repo_id, sub = self._split_repo_id(rest[1:])
                if repo_id is not None:
                    return self._repo_api(method, repo_type, repo_id, sub)
        elif segs[:2] == ["_lfs", "upload"] and len(segs) == 3 and method == "PUT":
            return self._lfs_put(segs[2])
        elif segs[:2] == ["_lfs", "verify"] and len(segs) == 3 and method == "POST":
            return self._lfs_verify(segs[2])
        else:
            parsed = self._parse_web_path(segs)
            if parsed is not None:
                repo_type, repo_id, action, tail = parsed
                if action == "resolve" and method in ("GET", "HEAD") and len(tail) >= 2:
                    revision, path = self._split_rev_and_path(tail)
                    return self._resolve_file(repo_type, repo_id, revision, path)
                if action == "lfs-batch" and method == "POST":
                    return self._lfs_batch(repo_type, repo_id)
        return self._unknown()

    def _unknown(self) -> None:
        route = f"{self.command} {self.path}"
        self.hub.unknown_routes.append(route)
        logger.warning("LocalHub: UNKNOWN ROUTE %s", route)
        print(f"[LocalHub] UNKNOWN ROUTE: {route} -> 404", file=sys.stderr)
        raise _HTTPError(404, f"LocalHub: unknown route {self.command} {self._raw_path}")

    @staticmethod
    def _split_repo_id(segs: list[str]) -> tuple[str | None, list[str]]:
        """['ns', 'name', 'tree', 'main'] -> ('ns/name', ['tree', 'main']); ['gpt2', 'tree', ...] -> ('gpt2', ...)."""
        if not segs or not segs[0]:
            return None, []
        if len(segs) >= 2 and segs[1] not in _API_SUBROUTES:
            return f"{segs[0]}/{segs[1]}", segs[2:]
        return segs[0], segs[1:]

    @staticmethod
    def _split_rev_and_path(tail: list[str]) -> tuple[str, str]:
        """Revision (quoted as one segment by huggingface_hub; raw 'refs/pr/1' tolerated) and the path after it."""
        if tail[0] == "refs" and len(tail) >= 3 and tail[1] in ("pr", "heads", "tags", "convert"):
            return "/".join(tail[:3]), "/".join(tail[3:])
        return tail[0], "/".join(tail[1:])

    @staticmethod
    def _parse_web_path(segs: list[str]) -> tuple[str, str, str, list[str]] | None:
        """/[datasets|spaces/]ns/name/resolve/... and /[...]ns/name.git/info/lfs/objects/batch."""
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type = _TYPE_FROM_PLURAL[segs[0]]
            segs = segs[1:]
        # LFS batch
        for n in (2, 1):
            if len(segs) == n + 4 and segs[n - 1].endswith(".git") and segs[n:] == ["info", "lfs", "objects", "batch"]:
                repo_id = "/".join(segs[: n - 1] + [segs[n - 1][: -len(".git")]])
                return repo_type, repo_id, "lfs-batch", []
        for n in (2, 1):
            if len(segs) > n and segs[n] == "resolve":
                return repo_type, "/".join(segs[:n]), "resolve", segs[n + 1 :]
        return None

    def _repo_api(self, method: str, repo_type: str, repo_id: str, sub: list[str]) -> None:
        if not sub and method == "GET":
            return self._repo_info(repo_type, repo_id, None)
        if not sub:
            return self._unknown()
        action, args = sub[0], sub[1:]
        if action == "revision" and method == "GET" and args:
            return self._repo_info(repo_type, repo_id, "/".join(args))
        if action == "preupload" and method == "POST" and args:
            return self._preupload(repo_type, repo_id, "/".join(args))
        if action == "commit" and method == "POST" and args:
            return self._commit(repo_type, repo_id, "/".join(args))
        if action == "tree" and method == "GET" and args:
            revision, path = self._split_rev_and_path(args)
            return self._tree(repo_type, repo_id, revision, path)
        if action == "paths-info" and method == "POST" and args:
            return self._paths_info(repo_type, repo_id, "/".join(args))
        if action == "refs" and method == "GET" and not args:
            return self._refs(repo_type, repo_id)
        if action == "commits" and method == "GET" and args:
            return self._list_commits(repo_type, repo_id, "/".join(args))
        if action == "branch" and args and method in ("POST", "DELETE"):
            return self._branch(method, repo_type, repo_id, "/".join(args))
        if action == "tag" and args and method in ("POST", "DELETE"):
            return self._tag(method, repo_type, repo_id, "/".join(args))
        if action == "settings" and method == "PUT" and not args:
            return self._settings(repo_type, repo_id)
        if action == "resolve" and method in ("GET", "HEAD") and len(args) >= 2:
            revision, path = self._split_rev_and_path(args)
            return self._resolve_file(repo_type, repo_id, revision, path)
        return self._unknown()

    def _json_body(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise _HTTPError(400, f"Invalid JSON body: {e}") from None

    # ------------------------------------------------------------------------------------------- endpoints

    def _whoami(self) -> None:
        token = self._token()
        if token is None:
            raise _HTTPError(401, "Invalid username or password.")
        self.hub._maybe_fail("whoami")
        role = "write" if token == self.hub.token else "read"
        hub = self.hub
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(hub.username.encode()).hexdigest()[:24],
                "name": hub.username,
                "fullname": hub.username.replace("-", " ").title(),
                "email": f"{hub.username}@localhost",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [
                    {"type": "org", "name": org, "fullname": org, "roleInOrg": "admin", "isEnterprise": False}
                    for org in hub.orgs
                ],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local-hub", "role": role}},
            }
        )

    def _create_repo(self) -> None:
        payload = self._json_body()
        name = payload.get("name")
        namespace = payload.get("organization") or self.hub.username
        repo_type = payload.get("type") or "model"
        if repo_type not in _PLURAL_FROM_TYPE:
            raise _HTTPError(400, f"Invalid repo type: {repo_type}")
        if not name or "/" in name or not re.fullmatch(r"[\w.\-]+", name) or "--" in name or ".." in name:
            raise _HTTPError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{namespace}/{name}"
        self._require_write(repo_id)
        self.hub._maybe_fail("create")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        hub = self.hub
        with hub._lock:
            if (repo_type, repo_id) in hub._repos:
                raise _HTTPError(409, f"You already created this {repo_type} repo: {repo_id}")
            repo = hub._new_repo(repo_type, repo_id, private)
        self._send_json({"url": hub._web_url(repo), "name": repo_id, "id": repo.uid})

    def _delete_repo(self) -> None:
        payload = self._json_body()
        repo_id = f"{payload.get('organization') or self.hub.username}/{payload.get('name')}"
        repo_type = payload.get("type") or "model"
        self._require_write(repo_id)
        with self.hub._lock:
            self._get_repo(repo_type, repo_id)
            del self.hub._repos[(repo_type, repo_id)]
        self._send_json({})

    def _move_repo(self) -> None:
        payload = self._json_body()
        src, dst, repo_type = payload.get("fromRepo"), payload.get("toRepo"), payload.get("type") or "model"
        self._require_write(src)
        self._require_write(dst)
        with self.hub._lock:
            repo = self._get_repo(repo_type, src)
            if (repo_type, dst) in self.hub._repos:
                raise _HTTPError(409, f"Repository {dst} already exists")
            del self.hub._repos[(repo_type, src)]
            repo.repo_id = dst
            self.hub._repos[(repo_type, dst)] = repo
        self._send_json({})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str | None) -> None:
        hub = self.hub
        with hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            hub._maybe_fail("info")
            oid = self._resolve(repo, revision or "main")
            commit = repo.commits[oid]
            blobs = _truthy((self.query.get("blobs") or [None])[0])
            siblings = []
            for path in sorted(commit.files):
                blob = commit.files[path]
                entry: dict[str, Any] = {"rfilename": path}
                if blobs:
                    entry["size"] = blob.size
                    entry["blobId"] = blob.oid
                    if blob.lfs:
                        entry["lfs"] = {"size": blob.size, "sha256": blob.sha256, "pointerSize": blob.pointer_size}
                siblings.append(entry)
            info: dict[str, Any] = {
                "_id": repo.uid,
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
                "sha": oid,
                "lastModified": _iso(commit.date),
                "createdAt": _iso(repo.created_at),
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "usedStorage": sum(b.size for b in commit.files.values()),
            }
            if repo_type == "model":
                info["modelId"] = repo.repo_id
                info["spaces"] = []
                config = commit.files.get("config.json")
                if config is not None:
                    try:
                        cfg = json.loads(config.data)
                        info["config"] = {
                            k: cfg[k] for k in ("architectures", "model_type") if isinstance(cfg, dict) and k in cfg
                        }
                    except ValueError:
                        pass
            elif repo_type == "space":
                info["sdk"] = "static"
                info["runtime"] = {"stage": "RUNNING", "hardware": {"current": None, "requested": None}}
        self._send_json(info)

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.hub
        repo = self._get_repo(repo_type, repo_id)
        self._require_write(repo_id)
        hub._maybe_fail("preupload")
        payload = self._json_body()
        files = payload.get("files")
        if not isinstance(files, list):
            raise _HTTPError(400, "Invalid preupload payload: 'files' must be a list")
        with hub._lock:
            oid = repo.resolve(revision)
            current = repo.commits[oid].files if oid is not None else {}
            out = []
            for f in files:
                path = _clean_path(f.get("path"))
                size = int(f.get("size") or 0)
                mode = "lfs" if hub._wants_lfs(path, size) else "regular"
                existing = current.get(path)
                remote_oid = None
                if existing is not None:
                    remote_oid = existing.sha256 if mode == "lfs" else git_blob_sha1(existing.data)
                out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": remote_oid})
        self._send_json({"files": out, "commitOid": oid})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.hub
        repo = self._get_repo(repo_type, repo_id)
        self._require_write(repo_id)
        create_pr = _truthy((self.query.get("create_pr") or [None])[0])

        # 1. Parse the whole NDJSON payload before touching anything.
        try:
            lines = [json.loads(line) for line in self.body.decode("utf-8").splitlines() if line.strip()]
        except ValueError as e:
            raise _HTTPError(400, f"Invalid NDJSON commit payload: {e}") from None
        if not lines or lines[0].get("key") != "header":
            raise _HTTPError(400, "Commit payload must start with a 'header' line")
        header = lines[0].get("value") or {}
        title = header.get("summary") or ""
        if not title.strip():
            raise _HTTPError(400, "Commit summary (title) cannot be empty")
        description = header.get("description") or ""
        parent_commit = header.get("parentCommit")

        with hub._lock:
            ref = repo.writable_ref(revision)
            if ref is None:
                if repo.resolve(revision) is not None:
                    raise _HTTPError(400, f"Invalid revision {revision!r}: commits can only be pushed to a branch")
                raise _HTTPError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
            base = hub._ref_oid(repo, ref)
            if parent_commit is not None and parent_commit != base:
                raise _HTTPError(
                    412, f"A commit has happened since. Parent commit {parent_commit} is not the head {base}"
                )

            # 2. Build the new tree (copy-on-write).
            tree = dict(repo.commits[base].files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value") or {}
                if key == "file":
                    path = _clean_path(value.get("path"))
                    encoding = (value.get("encoding") or "utf-8").lower()
                    content = value.get("content", "")
                    try:
                        data = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode()
                    except ValueError as e:
                        raise _HTTPError(400, f"Invalid base64 content for {path}: {e}") from None
                    tree[path] = _Blob(data)
                elif key == "lfsFile":
                    path = _clean_path(value.get("path"))
                    lfs_oid = value.get("oid")
                    data = hub._lfs_objects.get(lfs_oid)
                    if data is None:
                        data = next(
                            (
                                b.data
                                for r in hub._repos.values()
                                for c in r.commits.values()
                                for b in c.files.values()
                                if b.lfs and b.sha256 == lfs_oid
                            ),
                            None,
                        )
                    if data is None:
                        raise _HTTPError(422, f"LFS object {lfs_oid} for {path} has not been uploaded")
                    if value.get("size") is not None and int(value["size"]) != len(data):
                        raise _HTTPError(422, f"LFS object {lfs_oid}: size mismatch for {path}")
                    tree[path] = _Blob(data, lfs=True)
                elif key == "deletedFile":
                    path = value.get("path")
                    if path not in tree:
                        raise _HTTPError(
                            404, f"A file with this name doesn't exist: {path}", code="EntryNotFound"
                        )
                    del tree[path]
                elif key == "deletedFolder":
                    folder = (value.get("path") or "").rstrip("/")
                    doomed = [p for p in tree if folder == "" or p.startswith(folder + "/")]
                    if not doomed:
                        raise _HTTPError(
                            404, f"A folder with this name doesn't exist: {folder}", code="EntryNotFound"
                        )
                    for p in doomed:
                        del tree[p]
                else:
                    raise _HTTPError(400, f"Unknown commit operation key: {key!r}")

            # 3. Fault injection: fail *after* everything was prepared, before publishing.
            hub._maybe_fail("commit")

            # 4. Publish (atomic under the lock).
            pr_url = None
            if create_pr:
                number = max(list(repo.prs) + [0]) + 1
                repo.prs[number] = base
                ref = ("pr", number)
                pr_url = f"{hub._web_url(repo)}/discussions/{number}"
            oid = hub._publish(repo, ref, base, tree, title, description)
        self._send_json(
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{hub._web_url(repo)}/commit/{oid}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            }
        )

    @staticmethod
    def _file_entry(path: str, blob: _Blob) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
        return entry

    @staticmethod
    def _folder_entry(path: str, files: Mapping[str, _Blob]) -> dict[str, Any]:
        h = hashlib.sha1()
        for p in sorted(files):
            if p.startswith(path + "/"):
                h.update(f"{p}\0{files[p].oid}\n".encode())
        return {"type": "directory", "oid": h.hexdigest(), "size": 0, "path": path}

    @staticmethod
    def _last_commit(repo: _Repo, head: str, path: str) -> dict[str, Any]:
        """Most recent first-parent commit that changed ``path`` (file) or anything below it (folder)."""

        def snapshot(commit: _Commit) -> Any:
            if path in commit.files:
                return commit.files[path].oid
            return tuple(sorted((p, b.oid) for p, b in commit.files.items() if p.startswith(path + "/")))

        history = repo.history(head)
        last = history[0]
        current = snapshot(last)
        for commit in history[1:]:
            if snapshot(commit) != current:
                break
            last = commit
        return {"id": last.oid, "title": last.title, "date": _iso(last.date)}

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            hub._maybe_fail("tree")
            oid = self._resolve(repo, revision)
            files = repo.commits[oid].files
            recursive = _truthy((self.query.get("recursive") or [None])[0])
            expand = _truthy((self.query.get("expand") or [None])[0])
            path = path.strip("/")
            prefix = path + "/" if path else ""
            if path and path in files:
                raise _HTTPError(400, f"{path} is a file, not a directory")
            below = [p for p in files if p.startswith(prefix)]
            if path and not below:
                raise _HTTPError(404, f"Entry not found: {path}", code="EntryNotFound")
            dirs: set[str] = set()
            out_files: list[str] = []
            for p in below:
                rel = p[len(prefix) :]
                parts = rel.split("/")
                if recursive:
                    for i in range(1, len(parts)):
                        dirs.add(prefix + "/".join(parts[:i]))
                    out_files.append(p)
                elif len(parts) == 1:
                    out_files.append(p)
                else:
                    dirs.add(prefix + parts[0])
            entries = [self._folder_entry(d, files) for d in sorted(dirs)]
            entries += [self._file_entry(p, files[p]) for p in sorted(out_files)]
            if expand:
                for entry in entries:
                    entry["lastCommit"] = self._last_commit(repo, oid, entry["path"])
        self._send_json(entries, headers={"X-Repo-Commit": oid})

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.hub
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            payload = self._json_body()
            paths = payload.get("paths") or []
            expand = bool(payload.get("expand"))
        else:
            form = parse_qs(self.body.decode("utf-8"), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = _truthy((form.get("expand") or [None])[0])
        if isinstance(paths, str):
            paths = [paths]
        with hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            hub._maybe_fail("paths-info")
            oid = self._resolve(repo, revision)
            files = repo.commits[oid].files
            out = []
            for p in paths:
                p = p.strip("/")
                if p in files:
                    entry = self._file_entry(p, files[p])
                elif any(f.startswith(p + "/") for f in files):
                    entry = self._folder_entry(p, files)
                else:
                    continue
                if expand:
                    entry["lastCommit"] = self._last_commit(repo, oid, p)
                out.append(entry)
        self._send_json(out, headers={"X-Repo-Commit": oid})

    def _refs(self, repo_type: str, repo_id: str) -> None:
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            data: dict[str, Any] = {
                "branches": [
                    {"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in sorted(repo.branches.items())
                ],
                "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": o} for n, o in sorted(repo.tags.items())],
                "converts": [],
            }
            if _truthy((self.query.get("include_prs") or [None])[0]):
                data["pullRequests"] = [
                    {"name": str(n), "ref": f"refs/pr/{n}", "targetCommit": o} for n, o in sorted(repo.prs.items())
                ]
        self._send_json(data)

    def _list_commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            oid = self._resolve(repo, revision)
            items = [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "date": _iso(c.date),
                    "authors": [{"user": c.author}],
                    "parents": list(c.parents),
                }
                for c in repo.history(oid)
            ]
        self._send_json(items)

    def _branch(self, method: str, repo_type: str, repo_id: str, branch: str) -> None:
        repo = self._get_repo(repo_type, repo_id)
        self._require_write(repo_id)
        with self.hub._lock:
            if method == "DELETE":
                if branch not in repo.branches:
                    raise _HTTPError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
                if branch == "main":
                    raise _HTTPError(403, "Cannot delete the default branch")
                del repo.branches[branch]
                return self._send_json({})
            if branch in repo.branches:
                raise _HTTPError(409, f"Reference already exists: refs/heads/{branch}")
            start = self._json_body().get("startingPoint") or "main"
            repo.branches[branch] = self._resolve(repo, start)
        self._send_json({})

    def _tag(self, method: str, repo_type: str, repo_id: str, arg: str) -> None:
        repo = self._get_repo(repo_type, repo_id)
        self._require_write(repo_id)
        with self.hub._lock:
            if method == "DELETE":
                if arg not in repo.tags:
                    raise _HTTPError(404, f"Invalid rev id: {arg}", code="RevisionNotFound")
                del repo.tags[arg]
                return self._send_json({})
            tag = self._json_body().get("tag")
            if not tag:
                raise _HTTPError(400, "Missing 'tag'")
            if tag in repo.tags:
                raise _HTTPError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self._resolve(repo, arg)
        self._send_json({})

    def _settings(self, repo_type: str, repo_id: str) -> None:
        repo = self._get_repo(repo_type, repo_id)
        self._require_write(repo_id)
        payload = self._json_body()
        with self.hub._lock:
            if "private" in payload:
                repo.private = bool(payload["private"])
            if payload.get("visibility") in ("private", "public"):
                repo.private = payload["visibility"] == "private"
        self._send_json({})

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            hub._maybe_fail("resolve")
            oid = self._resolve(repo, revision)
            blob = repo.commits[oid].files.get(path)
        if blob is None:
            raise _HTTPError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": oid})
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
            "Cache-Control": "no-cache",
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(blob.size)
        data = blob.data
        rng = self.headers.get("Range")
        if rng and self.command == "GET":
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            if m and (m.group(1) or m.group(2)):
                size = len(data)
                if m.group(1):
                    start = int(m.group(1))
                    end = int(m.group(2)) if m.group(2) else size - 1
                else:  # suffix range: last N bytes
                    start = max(size - int(m.group(2)), 0)
                    end = size - 1
                end = min(end, size - 1)
                if start >= size or start > end:
                    raise _HTTPError(
                        416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"}
                    )
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                return self._send(206, data[start : end + 1], content_type="application/octet-stream", headers=headers)
        self._send(200, data, content_type="application/octet-stream", headers=headers)

    # ------------------------------------------------------------------------------------------------ LFS

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        hub = self.hub
        repo = self._get_repo(repo_type, repo_id)
        self._require_write(repo.repo_id)
        hub._maybe_fail("lfs")
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise _HTTPError(400, "LocalHub only supports the LFS 'upload' operation")
        objects = []
        for obj in payload.get("objects") or []:
            oid, size = obj.get("oid"), int(obj.get("size") or 0)
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not isinstance(oid, str) or not re.fullmatch(r"[0-9a-f]{64}", oid):
                entry["error"] = {"code": 422, "message": f"Invalid oid {oid!r}"}
            elif oid not in hub._lfs_objects:
                entry["actions"] = {
                    "upload": {
                        "href": f"{hub.url}/_lfs/upload/{oid}?size={size}&sig={hub._lfs_secret}",
                        "header": {},
                        "expires_in": 3600,
                    },
                    "verify": {"href": f"{hub.url}/_lfs/verify/{oid}", "header": {}},
                }
            objects.append(entry)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_put(self, oid: str) -> None:
        hub = self.hub
        if (self.query.get("sig") or [None])[0] != hub._lfs_secret:
            raise _HTTPError(403, "Invalid LFS upload signature")
        hub._maybe_fail("lfs")
        data = self.body
        if hashlib.sha256(data).hexdigest() != oid:
            raise _HTTPError(400, f"LFS upload: content does not match oid {oid}")
        expected = (self.query.get("size") or [None])[0]
        if expected is not None and int(expected) != len(data):
            raise _HTTPError(400, f"LFS upload: size mismatch for {oid}")
        with hub._lock:
            hub._lfs_objects[oid] = data
        self._send(200, b"", headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def _lfs_verify(self, oid: str) -> None:
        self._token()
        if oid not in self.hub._lfs_objects:
            raise _HTTPError(404, f"LFS object {oid} not found")
        self._send_json({"success": True})
