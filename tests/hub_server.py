"""A tiny in-memory, Hub-compatible HTTP server for offline tests of ``push_to_hub`` / ``from_pretrained``.

It implements exactly the endpoints the real ``huggingface_hub`` client (v1/v2) calls for:

- ``HfApi.create_repo``: ``POST /api/repos/create`` (409 when the repo exists, like the Hub);
- ``HfApi.create_commit``: ``POST /api/validate-yaml`` (README front matter), ``POST /api/models/{id}/preupload/{rev}``
  (answers ``uploadMode: "regular"`` plus the remote git oid so unchanged files are skipped), and
  ``POST /api/models/{id}/commit/{rev}`` (ndjson: ``header`` / ``file`` (base64) / ``deletedFile`` lines);
- ``HfApi.create_branch``: ``POST /api/models/{id}/branch/{branch}``;
- ``HfApi.model_info`` / ``repo_info``: ``GET /api/models/{id}[/revision/{rev}]``;
- ``HfApi.list_repo_tree`` / ``list_repo_files``: ``GET /api/models/{id}/tree/{rev}[/{path}]``;
- the client's agent registry: ``GET /api/agent-harnesses`` (empty);
- ``hf_hub_download`` / ``file_exists``: ``HEAD`` and ``GET /{id}/resolve/{rev}/{path}`` with ``X-Repo-Commit``,
  ``ETag`` (git blob sha1), ``Content-Length`` and, on errors, ``X-Error-Code`` (``RepoNotFound``,
  ``RevisionNotFound``, ``EntryNotFound``) so the client raises its usual typed errors.

Writes need an ``Authorization: Bearer ...`` header (any token), like the real Hub. Every request is recorded in
:attr:`HubServer.requests`. Revisions are branch names or full 40-hex commit ids.

Usage:
    >>> with HubServer() as hub:  # doctest: +SKIP
    ...     hub.url  # 'http://127.0.0.1:54321' -> point HF_ENDPOINT / huggingface_hub.constants.ENDPOINT at it
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

USER = "user"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as ``oid`` / ``ETag`` for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    message: str
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a (full) commit id."""
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)

    def commit(self, branch: str, files: dict[str, bytes], message: str) -> Commit:
        parent = self.branches.get(branch)
        seed = f"{self.repo_id}|{branch}|{parent}|{message}|{time.time_ns()}|{len(self.commits)}".encode()
        oid = hashlib.sha1(seed).hexdigest()
        commit = Commit(oid=oid, files=files, message=message, parent=parent)
        self.commits[oid] = commit
        self.branches[branch] = oid
        return commit


def _error(status: int, message: str, code: str | None = None, commit: str | None = None) -> Response:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    if commit:
        headers["X-Repo-Commit"] = commit
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class HubServer:
    """An in-memory Hub on ``127.0.0.1`` (random free port), served by uvicorn in a daemon thread."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.app = self._build_app()
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> HubServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("hub_server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, f"no revision {revision!r} in {repo_id}"
        return dict(commit.files)

    def history(self, repo_id: str, branch: str = "main") -> list[str]:
        """Commit ids of ``branch``, newest first."""
        repo = self.repos[repo_id]
        out, oid = [], repo.branches.get(branch)
        while oid is not None:
            out.append(oid)
            oid = repo.commits[oid].parent
        return out

    # ------------------------------------------------------------------ app
    def _build_app(self) -> FastAPI:  # noqa: C901 - one closure per endpoint keeps the routing readable
        app = FastAPI()
        hub = self

        @app.middleware("http")
        async def record(request: Request, call_next):  # noqa: ANN001, ANN202 - Starlette middleware signature
            hub.requests.append((request.method, request.url.path))
            return await call_next(request)

        def needs_auth(request: Request) -> Response | None:
            auth = request.headers.get("authorization", "")
            if not auth.lower().startswith("bearer ") or len(auth) <= len("bearer "):
                return _error(401, "Invalid credentials in Authorization header")
            return None

        def get_repo(repo_type: str, repo_id: str) -> Repo | Response:
            if repo_type != "models" or repo_id not in hub.repos:
                return _error(404, f"Repository {repo_id} not found", "RepoNotFound")
            return hub.repos[repo_id]

        @app.post("/api/repos/create")
        async def create_repo(request: Request) -> Response:
            if (denied := needs_auth(request)) is not None:
                return denied
            body = await request.json()
            if body.get("type", "model") not in (None, "model"):
                return _error(400, "only model repos are supported by this test server")
            repo_id = f"{body.get('organization') or USER}/{body['name']}"
            with hub._lock:
                if repo_id in hub.repos:  # the Hub's 409 body carries the url (create_repo(exist_ok=True) reads it)
                    return JSONResponse(
                        {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                        status_code=409,
                        headers={"X-Error-Message": "You already created this model repo"},
                    )
                repo = Repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
                repo.commit(
                    "main",
                    {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                    "initial commit",
                )
                hub.repos[repo_id] = repo
            return JSONResponse({"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        @app.get("/api/agent-harnesses")
        async def agent_harnesses() -> Response:  # user-agent registry the client fetches once a day
            return JSONResponse({"standardEnvVars": [], "harnesses": {}})

        @app.post("/api/validate-yaml")
        async def validate_yaml(request: Request) -> Response:
            content = (await request.json()).get("content", "")
            errors = []
            if content.startswith("---"):
                front = content.split("---", 2)[1] if content.count("---") >= 2 else ""
                try:
                    data = yaml.safe_load(front) or {}
                    if not isinstance(data, dict):
                        errors.append("metadata must be a mapping")
                    elif data.get("base_model") == "":
                        errors.append('"base_model" must be a non-empty model id')
                except yaml.YAMLError as err:
                    errors.append(f"invalid YAML: {err}")
            if errors:
                return JSONResponse({"errors": [{"message": e} for e in errors], "warnings": []}, status_code=400)
            return JSONResponse({"errors": [], "warnings": []})

        @app.post("/api/{repo_type}/{ns}/{name}/preupload/{revision:path}")
        async def preupload(repo_type: str, ns: str, name: str, revision: str, request: Request) -> Response:
            if (denied := needs_auth(request)) is not None:
                return denied
            repo = get_repo(repo_type, f"{ns}/{name}")
            if isinstance(repo, Response):
                return repo
            body = await request.json()
            head = repo.resolve(revision)
            files = []
            for item in body.get("files", []):
                remote = head.files.get(item["path"]) if head is not None else None
                files.append(
                    {
                        "path": item["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_sha1(remote) if remote is not None else None,
                    }
                )
            return JSONResponse({"files": files, "commitOid": head.oid if head else None})

        @app.post("/api/{repo_type}/{ns}/{name}/commit/{revision:path}")
        async def commit(repo_type: str, ns: str, name: str, revision: str, request: Request) -> Response:
            if (denied := needs_auth(request)) is not None:
                return denied
            repo = get_repo(repo_type, f"{ns}/{name}")
            if isinstance(repo, Response):
                return repo
            if request.query_params.get("create_pr"):
                return _error(400, "pull requests are not supported by this test server")
            if revision not in repo.branches:
                return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            lines = [json.loads(line) for line in (await request.body()).splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                return _error(400, "commit payload must start with a header line")
            header = lines[0]["value"]
            with hub._lock:
                head = repo.resolve(revision)
                assert head is not None
                parent = header.get("parentCommit")
                if parent is not None and parent != head.oid:
                    return _error(412, "A commit has happened since. Please refresh and try again.")
                files = dict(head.files)
                for line in lines[1:]:
                    key, value = line.get("key"), line.get("value", {})
                    if key == "file":
                        if value.get("encoding") != "base64":
                            return _error(400, "file content must be base64")
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif key == "deletedFile":
                        if value["path"] not in files:
                            return _error(404, "A file with this name doesn't exist", "EntryNotFound")
                        del files[value["path"]]
                    elif key == "deletedFolder":
                        prefix = value["path"].rstrip("/") + "/"
                        files = {p: b for p, b in files.items() if not p.startswith(prefix)}
                    else:
                        return _error(
                            400, f"unsupported commit operation {key!r} (this server only does regular files)"
                        )
                new = repo.commit(revision, files, header.get("summary", ""))
            return JSONResponse(
                {
                    "success": True,
                    "commitOid": new.oid,
                    "commitUrl": f"{hub.url}/{repo.repo_id}/commit/{new.oid}",
                    "pullRequestUrl": None,
                }
            )

        @app.post("/api/{repo_type}/{ns}/{name}/branch/{branch:path}")
        async def create_branch(repo_type: str, ns: str, name: str, branch: str, request: Request) -> Response:
            if (denied := needs_auth(request)) is not None:
                return denied
            repo = get_repo(repo_type, f"{ns}/{name}")
            if isinstance(repo, Response):
                return repo
            body = await request.json() if await request.body() else {}
            with hub._lock:
                if branch in repo.branches:
                    return _error(409, f"Reference already exists: refs/heads/{branch}")
                start = repo.resolve(body.get("startingPoint") or "main")
                if start is None:
                    return _error(404, "Invalid starting point", "RevisionNotFound")
                repo.branches[branch] = start.oid
            return JSONResponse({})

        def info(repo: Repo, commit: Commit) -> dict:
            return {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": "2024-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }

        @app.get("/api/{repo_type}/{ns}/{name}")
        async def model_info(repo_type: str, ns: str, name: str) -> Response:
            repo = get_repo(repo_type, f"{ns}/{name}")
            if isinstance(repo, Response):
                return repo
            return JSONResponse(info(repo, repo.resolve("main")))  # type: ignore[arg-type]

        @app.get("/api/{repo_type}/{ns}/{name}/revision/{revision:path}")
        async def model_info_revision(repo_type: str, ns: str, name: str, revision: str) -> Response:
            repo = get_repo(repo_type, f"{ns}/{name}")
            if isinstance(repo, Response):
                return repo
            commit = repo.resolve(revision)
            if commit is None:
                return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return JSONResponse(info(repo, commit))

        @app.get("/api/{repo_type}/{ns}/{name}/tree/{rest:path}")
        async def tree(repo_type: str, ns: str, name: str, rest: str, request: Request) -> Response:
            repo = get_repo(repo_type, f"{ns}/{name}")
            if isinstance(repo, Response):
                return repo
            raw = request.scope["raw_path"].decode().split("/tree/", 1)[1]
            revision, _, folder = raw.partition("/")
            commit = repo.resolve(unquote(revision))
            if commit is None:
                return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            folder = unquote(folder).strip("/")
            prefix = folder + "/" if folder else ""
            entries, dirs = [], set()
            recursive = request.query_params.get("recursive") in ("1", "true", "True")
            for path, data in sorted(commit.files.items()):
                if not path.startswith(prefix):
                    continue
                rel = path[len(prefix) :]
                if "/" in rel and not recursive:
                    dirs.add(prefix + rel.split("/", 1)[0])
                    continue
                entries.append({"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)})
            entries += [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)]
            return JSONResponse(entries)

        @app.api_route("/{ns}/{name}/resolve/{rest:path}", methods=["GET", "HEAD"])
        async def resolve(ns: str, name: str, rest: str, request: Request) -> Response:
            repo = get_repo("models", f"{ns}/{name}")
            if isinstance(repo, Response):
                return repo
            raw = request.scope["raw_path"].decode().split("/resolve/", 1)[1]
            revision, _, path = raw.partition("/")
            revision, path = unquote(revision), unquote(path)
            commit = repo.resolve(revision)
            if commit is None:
                return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            data = commit.files.get(path)
            if data is None:
                return _error(404, f"Entry not found: {path}", "EntryNotFound", commit=commit.oid)
            headers = {
                "X-Repo-Commit": commit.oid,
                "ETag": f'"{git_blob_sha1(data)}"',
                "Content-Length": str(len(data)),
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            if request.method == "HEAD":
                return Response(status_code=200, headers=headers)
            rng = request.headers.get("range")
            if rng and rng.startswith("bytes="):
                start_s, _, end_s = rng[len("bytes=") :].partition("-")
                start = int(start_s or 0)
                end = int(end_s) if end_s else len(data) - 1
                chunk = data[start : end + 1]
                headers.update({"Content-Length": str(len(chunk)), "Content-Range": f"bytes {start}-{end}/{len(data)}"})
                return Response(content=chunk, status_code=206, headers=headers)
            return Response(content=data, status_code=200, headers=headers)

        @app.api_route("/{full:path}", methods=["GET", "HEAD", "POST", "PUT", "DELETE"])
        async def unknown(full: str, request: Request) -> Response:
            hub.unknown.append((request.method, request.url.path))
            return _error(404, f"hub_server does not implement {request.method} /{full}")

        return app

def point_hub_client_at(url: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every huggingface_hub / transformers entry point use ``url`` and a private cache."""
    import huggingface_hub.hf_api as hf_api_module
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_api_module.api, "endpoint", url)  # module-level HfApi behind `file_exists` & co
    monkeypatch.setattr(transformers_hub, "_hf_api", None)  # transformers caches one HfApi per process
