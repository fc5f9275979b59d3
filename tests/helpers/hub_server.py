"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests that let `huggingface_hub.snapshot_download`
fill a real hub cache (no external network): `LocalHub(repos)` serves model repositories given as
{repo_id: {revision: {path in repo: bytes}}} from a thread of the test process, and `use_local_hub` points
huggingface_hub at it.

It answers only the requests `snapshot_download` (huggingface_hub 2.x, `_snapshot_download.py` and
`file_download.py`) makes for a branch or tag of a model repository:

- ``GET /api/models/{repo_id}/revision/{revision}`` (`HfApi.model_info`): ``{"id", "sha", "siblings"}``; the
  commit ``sha`` (40 hex digits) is what the cache's refs/{revision} and snapshots/{sha}/ are named by;
- ``GET /api/models/{repo_id}/tree/{sha}?recursive=True`` (`HfApi.list_repo_tree`): every file as
  ``{"type": "file", "path", "size", "oid"}`` on one page (no ``Link`` header: nothing to page through);
  snapshot_download filters these paths with its allow_patterns;
- ``HEAD`` and ``GET /{repo_id}/resolve/{sha}/{path}`` (`get_hf_file_metadata`, `http_get`): ``X-Repo-Commit``
  (required), ``ETag`` (the file's sha256, as the hub sends for LFS files; the cache names the blob by it)
  and ``Content-Length``; GET adds the bytes.

Anything else is a 404 with the hub's ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound), which
huggingface_hub turns into its own errors (huggingface_hub also asks once a process for
``/api/agent-harnesses``, a registry for its user agent, and ignores the 404). No Xet headers are sent, so
files come over plain HTTP. A commit sha is the sha1 of the revision's name and its files' hashes (distinct
for every revision); a blob's ``oid`` is its git blob sha1."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

__all__ = ["LocalHub", "use_local_hub"]


def _commit_sha(revision: str, files: dict[str, bytes]) -> str:
    h = hashlib.sha1(revision.encode())
    for path in sorted(files):
        h.update(path.encode() + hashlib.sha256(files[path]).digest())
    return h.hexdigest()


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class LocalHub:
    """The hub for `repos` {repo_id: {revision: {path: bytes}}} on a free port of 127.0.0.1, serving from
    construction until `stop()`. `endpoint`: its URL (for HF_ENDPOINT); `commits[repo_id][revision]`: the
    commit sha of each revision."""

    def __init__(self, repos: dict[str, dict[str, dict[str, bytes]]]):
        self.repos = repos
        self.commits = {repo: {rev: _commit_sha(rev, files) for rev, files in revs.items()}
                        for repo, revs in repos.items()}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the port (a no-op when stopped already)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def answer(self, method: str, url: str) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of the request `method` `url` (module docstring)."""
        path = [unquote(p) for p in urlsplit(url).path.strip("/").split("/")]
        base = 4 if path[:2] == ["api", "models"] else 2  # where {kind}/{revision}/... starts
        repo_id = "/".join(path[base - 2:base])
        if repo_id not in self.repos or len(path) < base + 2:
            return 404, {"X-Error-Code": "RepoNotFound"}, b""
        kind, rev, name = path[base], path[base + 1], "/".join(path[base + 2:])
        rev = next((n for n, sha in self.commits[repo_id].items() if sha == rev), rev)  # a sha: its name
        if rev not in self.repos[repo_id]:
            return 404, {"X-Error-Code": "RevisionNotFound"}, b""
        files, sha = self.repos[repo_id][rev], self.commits[repo_id][rev]
        if (base, kind) == (4, "revision"):
            info = {"id": repo_id, "sha": sha, "siblings": [{"rfilename": p} for p in sorted(files)]}
            return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()
        if (base, kind) == (4, "tree"):
            tree = [{"type": "file", "path": p, "size": len(d), "oid": _git_blob_sha1(d)} for p, d in files.items()]
            return 200, {"Content-Type": "application/json"}, json.dumps(tree).encode()
        if (base, kind) == (2, "resolve") and name in files:
            data = files[name]
            return 200, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, data
        return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, b""


def _handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, body: bool) -> None:
            status, headers, data = hub.answer(self.command, self.path)
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._reply(body=True)

        def do_HEAD(self):  # noqa: N802
            self._reply(body=False)

        def log_message(self, *args):  # quiet
            pass

    return Handler


def use_local_hub(monkeypatch, endpoint: str, cache_dir, offline: bool = False) -> None:
    """Point huggingface_hub (in this process, through `monkeypatch`) at the hub `endpoint` with its cache in
    `cache_dir`, online or `offline` (HF_HUB_OFFLINE: the cache only): constants.ENDPOINT and the download URL
    template built from it at import time, HF_HUB_CACHE, HF_HUB_OFFLINE; the environment variables too, for
    code that reads them."""
    import huggingface_hub.constants as c

    for name, value in {"ENDPOINT": endpoint, "HUGGINGFACE_CO_URL_TEMPLATE":
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}", "HF_HUB_CACHE": str(cache_dir),
                        "HF_HUB_OFFLINE": offline}.items():
        monkeypatch.setattr(c, name, value)
    for name, value in {"HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(cache_dir),
                        "HF_HUB_OFFLINE": str(int(offline))}.items():
        monkeypatch.setenv(name, value)
