"""A local Hugging Face Hub-compatible HTTP server for the tests (standard library only).

``LocalHub`` answers the requests that huggingface_hub (2.4), transformers and datasets make for what
hfprune and its tests do: push a checkpoint (``push_pruned``, ``push_to_hub``, ``upload_folder``) and
load a model or data set by hub id (``from_pretrained``, ``snapshot_download``, ``load_dataset``):

- ``GET  /api/whoami-v2``; ``POST /api/repos/create``; ``POST /api/validate-yaml`` (README.md metadata)
- ``GET  /api/{models,datasets}/{ns}/{name}[/revision/{rev}]`` (repo info)
- ``GET  /api/{models,datasets}/{ns}/{name}/tree/{rev}[/{path}]`` (``recursive``)
- ``POST /api/{models,datasets}/{ns}/{name}/preupload/{rev}`` ("regular", or "lfs" by size or name)
- ``POST /api/{models,datasets}/{ns}/{name}/commit/{rev}`` (NDJSON: header, file, lfsFile, deletedFile)
- ``POST /api/{models,datasets}/{ns}/{name}/branch/{branch}``
- ``HEAD|GET /[datasets/]{ns}/{name}/resolve/{rev}/{path}`` (``X-Repo-Commit``, ``ETag``; never Xet)
- Git LFS: ``POST /[datasets/]{ns}/{name}.git/info/lfs/objects/batch``, then ``PUT`` / verify on this server.

Anything else answers 404 and is recorded in ``LocalHub.unknown_routes`` (tests assert it stays empty, so
a library upgrade that needs a new route shows up as such); a bug in a handler answers 500 and is recorded
in ``LocalHub.server_errors``.

Storage is in memory: every commit keeps an immutable ``{path: blob}`` mapping, and a commit is published
with one assignment under a lock, so a failed commit leaves the repository exactly as it was.

Auth, as on the Hub: a wrong token gets 401 everywhere; writes need the token (401 without one); writes to
repos matching ``forbidden_repos`` (fnmatch patterns, e.g. ``"org/*"``) get 403; unknown repos get 404 with
``X-Error-Code: RepoNotFound``, private ones 401 without a token. ``inject_fault`` (or
``fail_next_commit = 500``) makes the next request(s) to a route fail; a commit fails after its payload is
parsed and its tree built, right before it would have been published.
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
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["LocalHub", "HubRequest"]

logger = logging.getLogger("tests.hub_server")

_TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset"}
_URL_PREFIX = {"model": "", "dataset": "datasets/"}  # of web and resolve URLs
_HEX40 = re.compile(r"[0-9a-f]{40}")
_LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
_GITATTRIBUTES = "".join(
    f"*.{suffix} filter=lfs diff=lfs merge=lfs -text\n"
    for suffix in ("bin", "ckpt", "gguf", "h5", "npy", "onnx", "parquet", "pt", "pth", "safetensors", "zip")
)


def _git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob (``git hash-object``), which the Hub reports for regular files."""
    digest = hashlib.sha1(b"blob %d\0" % len(data))
    digest.update(data)
    return digest.hexdigest()


def _iso(moment: _dt.datetime) -> str:
    # The format huggingface_hub's `parse_datetime` expects: '%Y-%m-%dT%H:%M:%S.%fZ' (milliseconds).
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


# ---------------------------------------------------------------------------------------------------- storage


class _Blob:
    """Immutable file content. LFS blobs are reported with their LFS metadata (tree, resolve headers)."""

    __slots__ = ("_data", "size", "lfs", "sha256", "oid", "pointer_size")

    def __init__(self, data: bytes, lfs: bool = False) -> None:
        self._data, self.size = bytes(data), len(data)
        self._set_ids(lfs, hashlib.sha256(self._data).hexdigest() if lfs else None, _git_blob_sha1(self._data))

    def _set_ids(self, lfs: bool, sha256: str | None, git_oid: str) -> None:
        self.lfs, self.sha256 = lfs, sha256
        if lfs:
            pointer = _LFS_POINTER.format(oid=sha256, size=self.size).encode()
            self.oid, self.pointer_size = _git_blob_sha1(pointer), len(pointer)  # the pointer's git id, as on the Hub
        else:
            self.oid, self.pointer_size = git_oid, 0

    @property
    def data(self) -> bytes:
        return self._data

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid  # as the Hub: sha256 for LFS files, git sha1 otherwise


class _CachedBlob(_Blob):
    """A file of a hub-cache snapshot, read from disk only when downloaded. The cache names a blob by the
    etag the Hub gave it (sha256 for LFS files, git sha1 otherwise), so nothing needs hashing."""

    __slots__ = ("_path",)

    def __init__(self, path: Path) -> None:
        self._path = path.resolve()
        self.size = self._path.stat().st_size
        name = self._path.name
        self._set_ids(len(name) == 64, name if len(name) == 64 else None, name)

    @property
    def data(self) -> bytes:
        return self._path.read_bytes()


@dataclass(frozen=True)
class _Commit:
    oid: str
    parent: str | None
    title: str
    date: _dt.datetime
    files: Mapping[str, _Blob]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: _dt.datetime = field(default_factory=_now)
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid

    def resolve(self, revision: str) -> str | None:
        """Commit oid of a branch or a full commit sha."""
        if revision in self.branches:
            return self.branches[revision]
        return revision if _HEX40.fullmatch(revision) and revision in self.commits else None

    def history(self, oid: str) -> list[_Commit]:
        """Newest first."""
        out, current = [], oid
        while current is not None:
            out.append(self.commits[current])
            current = self.commits[current].parent
        return out


@dataclass(frozen=True)
class HubRequest:
    """One request as the server saw it (for assertions in tests)."""

    method: str
    path: str  # without the query string
    query: str
    status: int


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, dict(headers or {})


@dataclass
class _Fault:
    status: int
    times: int


# ---------------------------------------------------------------------------------------------------- the hub


class LocalHub:
    """A Hub-compatible HTTP server on ``127.0.0.1`` (background thread).

    Args:
        token: the valid write token (``Authorization: Bearer <token>``).
        username, orgs: what ``whoami`` reports; repos created without a namespace go to ``username``.
        port: ``0`` picks a free port; a restart after ``stop()`` comes back on the same one.

    Tweakable attributes (``reset()`` restores them): ``forbidden_repos``; ``lfs_threshold`` (files of at
    least this many bytes go through Git LFS; ``None``: by name only); ``lfs_patterns`` (fnmatch on the path
    or the file name; ``*.parquet`` because ``datasets.push_to_hub`` pre-uploads its shards and deletes
    them before the commit, so they must be LFS).
    """

    def __init__(self, token: str = "hf_test_token", *, username: str = "test-user",
                 orgs: Iterable[str] = ("test-org",), host: str = "127.0.0.1", port: int = 0) -> None:
        self.token, self.username, self.orgs = token, username, list(orgs)
        self._host, self._port = host, port
        self.requests: list[HubRequest] = []
        self.unknown_routes: list[str] = []
        self.server_errors: list[str] = []
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lfs_objects: dict[str, bytes] = {}  # sha256 -> content, uploaded through the LFS PUT target
        self._faults: dict[str, _Fault] = {}
        self._lfs_secret = secrets.token_hex(8)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._snapshots: dict[str, Path] = {}
        self.reset()

    # ------------------------------------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> "LocalHub":
        if self._server is None:
            server = _Server((self._host, self._port), _Handler)
            server.hub = self
            self._server, self._port = server, server.server_address[1]
            self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"LocalHub:{self.url}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        with self._connections_lock:  # keep-alive connections parked in their handler threads
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget every repo, upload, fault and recorded request, and undo the tweaks; the URL stays."""
        with self._lock:
            for store in (self._repos, self._lfs_objects, self._faults):
                store.clear()
            for record in (self.requests, self.unknown_routes, self.server_errors):
                record.clear()
            self.forbidden_repos: set[str] = set()
            self.lfs_threshold: int | None = None
            self.lfs_patterns: list[str] = ["*.parquet", "*.arrow"]
            for repo_id, snapshot in self._snapshots.items():
                self._add_snapshot(repo_id, snapshot)

    def serve_snapshot(self, repo_id: str, snapshot: str | Path) -> None:
        """Serve a hub-cache snapshot directory as ``repo_id``'s ``main``, at the snapshot's own commit, from now
        on (``reset()`` keeps it). A client whose cache holds that snapshot finds every file current and
        downloads nothing, as it would from the real Hub."""
        self._snapshots[repo_id] = Path(snapshot)
        with self._lock:
            self._add_snapshot(repo_id, Path(snapshot))

    def _add_snapshot(self, repo_id: str, snapshot: Path) -> None:
        repo = _Repo("model", repo_id, private=False)
        files = {p.relative_to(snapshot).as_posix(): _CachedBlob(p) for p in snapshot.rglob("*") if p.is_file()}
        repo.commits[snapshot.name] = _Commit(snapshot.name, None, "snapshot", _now(), files)
        repo.branches["main"] = snapshot.name
        self._repos[("model", repo_id)] = repo

    # ------------------------------------------------------------------------------------- fault injection

    def inject_fault(self, route: str, status: int = 500, times: int = 1) -> None:
        """The next ``times`` requests to ``route`` fail with ``status``. ``route``: ``"commit"``,
        ``"preupload"``, ``"create"``, ``"info"``, ``"tree"``, ``"resolve"``, ``"lfs"``, ``"whoami"`` or
        ``"*"`` (any of those)."""
        with self._lock:
            if times <= 0:
                self._faults.pop(route, None)
            else:
                self._faults[route] = _Fault(status, times)

    @property
    def fail_next_commit(self) -> int | None:
        fault = self._faults.get("commit")
        return fault.status if fault is not None else None

    @fail_next_commit.setter
    def fail_next_commit(self, status: int | None) -> None:
        self.inject_fault("commit", status or 500, times=0 if status is None else 1)

    def _maybe_fail(self, route: str) -> None:
        with self._lock:
            for key in (route, "*"):
                fault = self._faults.get(key)
                if fault is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        del self._faults[key]
                    raise _HTTPError(fault.status, f"Injected HTTP {fault.status}")

    # ------------------------------------------------------------------------- server-side view, for tests

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> None:
        """Create a repo directly (no HTTP), e.g. to seed a test."""
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise ValueError(f"{repo_type} repo {repo_id} already exists")
            self._new_repo(repo_type, repo_id, private)

    def upload_files(self, repo_id: str, files: Mapping[str, bytes | str | Path], *, repo_type: str = "model",
                     message: str = "Upload files") -> str:
        """Commit ``files`` (path -> bytes / text / local file) to ``main`` directly, creating the repo if
        needed. Returns the commit sha."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id)) or self._new_repo(repo_type, repo_id, False)
            head = repo.branches["main"]
            tree = dict(repo.commits[head].files)
            for path, content in files.items():
                content = content.read_bytes() if isinstance(content, Path) else content
                tree[_clean_path(path)] = _Blob(content.encode() if isinstance(content, str) else content)
            return self._publish(repo, "main", tree, message)

    def delete_repo(self, repo_id: str, repo_type: str = "model") -> None:
        """Forget a repo (a served snapshot comes back at the next ``reset()``)."""
        with self._lock:
            self._repos.pop((repo_type, repo_id), None)

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        return (repo_type, repo_id) in self._repos

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit sha that ``revision`` points to."""
        with self._lock:
            oid = self._repos[(repo_type, repo_id)].resolve(revision)
        if oid is None:
            raise KeyError(f"revision {revision!r} not found in {repo_id}")
        return oid

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """``{path: content}`` at ``revision``."""
        oid = self.head(repo_id, revision, repo_type)
        return {path: blob.data for path, blob in self._repos[(repo_type, repo_id)].commits[oid].files.items()}

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        return sorted(self.files(repo_id, revision, repo_type))

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict[str, Any]]:
        """History, newest first: ``[{"oid", "title", "files"}]``."""
        oid = self.head(repo_id, revision, repo_type)
        history = self._repos[(repo_type, repo_id)].history(oid)
        return [{"oid": c.oid, "title": c.title, "files": sorted(c.files)} for c in history]

    def requests_to(self, fragment: str, method: str | None = None) -> list[HubRequest]:
        """Recorded requests whose path contains ``fragment`` (and whose method is ``method``)."""
        return [r for r in list(self.requests) if fragment in r.path and method in (None, r.method)]

    # ---------------------------------------------------------------------------------------------- internals

    def _new_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        # Like the Hub, a new repo starts with an "initial commit" holding .gitattributes.
        repo = _Repo(repo_type, repo_id, private)
        self._repos[(repo_type, repo_id)] = repo
        oid = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        files = {".gitattributes": _Blob(_GITATTRIBUTES.encode())}
        repo.commits[oid] = _Commit(oid, None, "initial commit", _now(), files)
        repo.branches["main"] = oid
        return repo

    def _publish(self, repo: _Repo, branch: str, tree: dict[str, _Blob], title: str) -> str:
        """Add a commit on top of ``branch`` and move the branch to it (caller holds the lock)."""
        parent = repo.branches[branch]
        digest = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{title}\n{uuid.uuid4()}\n".encode())
        for path in sorted(tree):
            digest.update(f"{path}\0{tree[path].oid}\n".encode())
        oid = digest.hexdigest()
        repo.commits[oid] = _Commit(oid, parent, title, _now(), dict(tree))
        repo.branches[branch] = oid
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
    allow_reuse_address = True  # restart on the same port at once
    hub: LocalHub

    def process_request(self, request, client_address):  # tracked, so stop() can close them
        with self.hub._connections_lock:
            self.hub._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.hub._connections_lock:
            self.hub._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # a client that went away is no error
            super().handle_error(request, client_address)


def _clean_path(path: Any) -> str:
    """A relative path in a repo, without '..' or empty segments."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path or "\0" in path:
        raise _HTTPError(400, f"Invalid path: {path!r}")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise _HTTPError(400, f"Invalid path: {path!r}")
    return path


# ---------------------------------------------------------------------------------------------- the handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub (huggingface_hub pools connections)
    server_version = "LocalHub/1.0"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no access log on stderr
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    @property
    def hub(self) -> LocalHub:
        return self.server.hub

    # ------------------------------------------------------------------------------------------- plumbing

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():  # httpx streams commit payloads
            chunks = []
            while size := int(self.rfile.readline(65537).split(b";", 1)[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)  # the CRLF after a chunk
            while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query, keep_blank_values=True)
        self._status = 0
        try:
            self.body = self._read_body()
            self._route([unquote(s) for s in split.path.strip("/").split("/")])
        except _HTTPError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug in the server: say so loudly
            import traceback

            self.hub.server_errors.append(f"{self.command} {self.path}: {exc!r}")
            print(f"[LocalHub] INTERNAL ERROR on {self.command} {self.path}\n{traceback.format_exc()}", file=sys.stderr)
            try:
                self._send_error(_HTTPError(500, f"LocalHub internal error: {exc!r}"))
            except OSError:
                self.close_connection = True
        finally:
            self.hub.requests.append(HubRequest(self.command, split.path, split.query, self._status))

    def _send(self, status: int, body: bytes = b"", *, content_type: str = "application/json",
              headers: Mapping[str, str] | None = None, content_length: int | None = None) -> None:
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

    def _send_error(self, error: _HTTPError) -> None:
        headers = dict(error.headers)
        headers["X-Error-Message"] = error.message.replace("\n", " ").encode("latin-1", "replace").decode("latin-1")
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json({"error": error.message}, status=error.status, headers=headers)

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body) if self.body else {}
        except ValueError as error:
            raise _HTTPError(400, f"Invalid JSON body: {error}") from None

    # ----------------------------------------------------------------------------------------------- auth

    def _token(self) -> str | None:
        """The token sent, None without one; 401 for a wrong one."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip() == self.hub.token:
            return self.hub.token
        raise _HTTPError(401, "Invalid credentials in Authorization header")

    def _require_write(self, repo_id: str) -> None:
        if self._token() is None:
            raise _HTTPError(401, "Authentication required: send a valid 'Authorization: Bearer <token>' header")
        if self.hub._writes_forbidden(repo_id):
            raise _HTTPError(403, f"You don't have the rights to write to {repo_id} (forbidden on this LocalHub)")

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
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

    # -------------------------------------------------------------------------------------------- routing

    def _route(self, segs: list[str]) -> None:
        method = self.command
        if segs[:1] == ["api"]:
            rest = segs[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if rest == ["validate-yaml"] and method == "POST":
                return self._send_json({"errors": [], "warnings": []})
            if len(rest) >= 3 and rest[0] in _TYPE_FROM_PLURAL:
                return self._repo_api(method, _TYPE_FROM_PLURAL[rest[0]], "/".join(rest[1:3]), rest[3:])
        elif segs[:2] == ["_lfs", "upload"] and len(segs) == 3 and method == "PUT":
            return self._lfs_put(segs[2])
        elif segs[:2] == ["_lfs", "verify"] and len(segs) == 3 and method == "POST":
            return self._lfs_verify(segs[2])
        else:
            repo_type = "dataset" if segs[:1] == ["datasets"] else "model"
            segs = segs[1:] if repo_type == "dataset" else segs
            if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve_file(repo_type, "/".join(segs[:2]), segs[3], "/".join(segs[4:]))
            if segs[1:] and segs[1].endswith(".git") and segs[2:] == ["info", "lfs", "objects", "batch"] \
                    and method == "POST":
                return self._lfs_batch(repo_type, f"{segs[0]}/{segs[1][:-len('.git')]}")
        self._unknown()

    def _repo_api(self, method: str, repo_type: str, repo_id: str, sub: list[str]) -> None:
        action, revision = (sub[0], "/".join(sub[1:])) if sub else (None, "")
        if action is None and method == "GET":
            return self._repo_info(repo_type, repo_id, "main")
        if action == "revision" and revision and method == "GET":
            return self._repo_info(repo_type, repo_id, revision)
        if action == "tree" and revision and method == "GET":
            return self._tree(repo_type, repo_id, sub[1], "/".join(sub[2:]))
        if action == "preupload" and revision and method == "POST":
            return self._preupload(repo_type, repo_id, revision)
        if action == "commit" and revision and method == "POST":
            return self._commit(repo_type, repo_id, revision)
        if action == "branch" and revision and method == "POST":
            return self._create_branch(repo_type, repo_id, revision)
        self._unknown()

    def _unknown(self) -> None:
        route = f"{self.command} {self.path}"
        self.hub.unknown_routes.append(route)
        print(f"[LocalHub] UNKNOWN ROUTE: {route} -> 404", file=sys.stderr)
        raise _HTTPError(404, f"LocalHub: unknown route {route}")

    # ------------------------------------------------------------------------------------------ endpoints

    def _whoami(self) -> None:
        if self._token() is None:
            raise _HTTPError(401, "Invalid username or password.")
        self.hub._maybe_fail("whoami")
        hub = self.hub
        self._send_json({
            "type": "user",
            "id": hashlib.sha1(hub.username.encode()).hexdigest()[:24],
            "name": hub.username,
            "fullname": hub.username,
            "email": f"{hub.username}@localhost",
            "emailVerified": True,
            "isPro": False,
            "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "admin"} for org in hub.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "local-hub", "role": "write"}},
        })

    def _create_repo(self) -> None:
        payload = self._json_body()
        name, repo_type = payload.get("name"), payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HTTPError(400, f"Invalid repo type: {repo_type}")
        if not name or not re.fullmatch(r"[\w.\-]+", name) or "--" in name or ".." in name:
            raise _HTTPError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{payload.get('organization') or self.hub.username}/{name}"
        self._require_write(repo_id)  # before the existence check: exist_ok then falls back to repo_info
        self.hub._maybe_fail("create")
        with self.hub._lock:
            if (repo_type, repo_id) in self.hub._repos:
                raise _HTTPError(409, f"You already created this {repo_type} repo: {repo_id}")
            repo = self.hub._new_repo(repo_type, repo_id, payload.get("visibility") == "private"
                                      or bool(payload.get("private")))
        self._send_json({"url": self.hub._web_url(repo), "name": repo_id})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            self.hub._maybe_fail("info")
            commit = repo.commits[self._resolve(repo, revision)]
            info = {
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": _iso(commit.date),
                "createdAt": _iso(repo.created_at),
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
        self._send_json(info)

    @staticmethod
    def _file_entry(path: str, blob: _Blob) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
        return entry

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            self.hub._maybe_fail("tree")
            oid = self._resolve(repo, revision)
            files = repo.commits[oid].files
        recursive = (self.query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        below = [p for p in files if p.startswith(prefix)]
        if prefix and not below:
            raise _HTTPError(404, f"Entry not found: {path}", code="EntryNotFound")
        folders, listed = set(), []
        for p in below:
            parts = p[len(prefix):].split("/")
            if recursive:  # every file, and every folder above one
                listed.append(p)
                folders.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
            elif len(parts) == 1:
                listed.append(p)
            else:  # one level: the folder, not what is in it
                folders.add(prefix + parts[0])
        entries = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in sorted(folders)]
        entries += [self._file_entry(p, files[p]) for p in sorted(listed)]
        self._send_json(entries, headers={"X-Repo-Commit": oid})

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._get_repo(repo_type, repo_id)
        self._require_write(repo_id)
        self.hub._maybe_fail("preupload")
        files = self._json_body().get("files")
        if not isinstance(files, list):
            raise _HTTPError(400, "Invalid preupload payload: 'files' must be a list")
        with self.hub._lock:
            oid = repo.resolve(revision)
            current = repo.commits[oid].files if oid is not None else {}
            answers = []
            for entry in files:
                path = _clean_path(entry.get("path"))
                mode = "lfs" if self.hub._wants_lfs(path, int(entry.get("size") or 0)) else "regular"
                existing = current.get(path)
                remote = None if existing is None else existing.sha256 if mode == "lfs" else existing.oid
                answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": remote})
        self._send_json({"files": answers, "commitOid": oid})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.hub
        repo = self._get_repo(repo_type, repo_id)
        self._require_write(repo_id)
        try:  # the whole payload is parsed before anything is touched
            lines = [json.loads(line) for line in self.body.decode("utf-8").splitlines() if line.strip()]
        except ValueError as error:
            raise _HTTPError(400, f"Invalid NDJSON commit payload: {error}") from None
        if not lines or lines[0].get("key") != "header":
            raise _HTTPError(400, "Commit payload must start with a 'header' line")
        header = lines[0].get("value") or {}
        title = (header.get("summary") or "").strip()
        if not title:
            raise _HTTPError(400, "Commit summary (title) cannot be empty")
        with hub._lock:
            if revision not in repo.branches:
                raise _HTTPError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
            base = repo.branches[revision]
            parent = header.get("parentCommit")
            if parent is not None and parent != base:
                raise _HTTPError(412, f"A commit has happened since. Parent commit {parent} is not the head {base}")
            tree = dict(repo.commits[base].files)  # copy on write
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value") or {}
                if key not in ("file", "lfsFile", "deletedFile"):
                    raise _HTTPError(400, f"Unknown commit operation key: {key!r}")
                path = _clean_path(value.get("path"))
                if key == "file":
                    content = value.get("content", "")
                    try:
                        data = (base64.b64decode(content, validate=True)
                                if (value.get("encoding") or "").lower() == "base64" else content.encode())
                    except ValueError as error:
                        raise _HTTPError(400, f"Invalid base64 content for {path}: {error}") from None
                    tree[path] = _Blob(data)
                elif key == "lfsFile":
                    data = hub._lfs_objects.get(value.get("oid"))
                    if data is None or (value.get("size") is not None and int(value["size"]) != len(data)):
                        raise _HTTPError(422, f"LFS object {value.get('oid')} for {path} was not uploaded")
                    tree[path] = _Blob(data, lfs=True)
                elif tree.pop(path, None) is None:  # deletedFile
                    raise _HTTPError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            hub._maybe_fail("commit")  # after everything is prepared, before publishing
            oid = hub._publish(repo, revision, tree, title)
        self._send_json({"success": True, "commitOid": oid, "commitUrl": f"{hub._web_url(repo)}/commit/{oid}",
                         "pullRequestUrl": None, "hookOutput": ""})

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        repo = self._get_repo(repo_type, repo_id)
        self._require_write(repo_id)
        with self.hub._lock:
            if branch in repo.branches:
                raise _HTTPError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = self._resolve(repo, self._json_body().get("startingPoint") or "main")
        self._send_json({})

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            self.hub._maybe_fail("resolve")
            oid = self._resolve(repo, revision)
            blob = repo.commits[oid].files.get(path)
        if blob is None:
            raise _HTTPError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": oid})
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{blob.etag}"',
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        body = b"" if self.command == "HEAD" else blob.data
        self._send(200, body, content_type="application/octet-stream", headers=headers, content_length=blob.size)

    # ------------------------------------------------------------------------------------------------ LFS

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        hub = self.hub
        self._get_repo(repo_type, repo_id)
        self._require_write(repo_id)
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
            elif oid not in hub._lfs_objects:  # already there: no actions, the client skips it
                entry["actions"] = {
                    "upload": {"href": f"{hub.url}/_lfs/upload/{oid}?size={size}&sig={hub._lfs_secret}", "header": {}},
                    "verify": {"href": f"{hub.url}/_lfs/verify/{oid}", "header": {}},
                }
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str) -> None:
        hub = self.hub
        if (self.query.get("sig") or [None])[0] != hub._lfs_secret:
            raise _HTTPError(403, "Invalid LFS upload signature")
        hub._maybe_fail("lfs")
        if hashlib.sha256(self.body).hexdigest() != oid or int((self.query.get("size") or ["-1"])[0]) != len(self.body):
            raise _HTTPError(400, f"LFS upload: content does not match oid {oid} and its size")
        with hub._lock:
            hub._lfs_objects[oid] = self.body
        self._send(200, headers={"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})

    def _lfs_verify(self, oid: str) -> None:
        self._token()
        if oid not in self.hub._lfs_objects:
            raise _HTTPError(404, f"LFS object {oid} not found")
        self._send_json({"success": True})
