"""The browser chat page as the Python side ships it: `qwen-edge serve --web` and `package --target web`.

The page itself runs in headless Chromium in runtimes/js/test/browser.test.js (npm test).
"""

from __future__ import annotations

import json
import posixpath
import re
import threading
import urllib.error
import urllib.request
import zipfile

import pytest

from edge.artifact.package import package
from qwen_edge.bundle import verify_bundle
from qwen_edge.cli import main
from qwen_edge.webpage import ISOLATION_HEADERS, PAGE_DIR, WebServer, page_files


@pytest.fixture
def served(tiny_artifact):
    server = WebServer(tiny_artifact(), port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None


def _get(url: str):
    try:
        return urllib.request.build_opener(_NoRedirect).open(url, timeout=10)
    except urllib.error.HTTPError as e:
        return e


def test_serve_web_routes_and_isolation_headers(served):
    root = _get(f"{served}/")
    assert root.status == 302 and root.headers["Location"] == f"/{PAGE_DIR}/"
    page = _get(f"{served}/{PAGE_DIR}/")
    assert page.status == 200 and b'type="importmap"' in page.read()
    for name, value in ISOLATION_HEADERS.items():
        assert page.headers[name] == value
    module = _get(f"{served}/{PAGE_DIR}/src/generator.js")
    assert module.status == 200 and module.headers["Content-Type"] == "text/javascript"
    wasm = _get(f"{served}/{PAGE_DIR}/vendor/onnxruntime-web/ort-wasm-simd-threaded.jsep.wasm")
    assert wasm.status == 200 and wasm.headers["Content-Type"] == "application/wasm"
    assert json.loads(_get(f"{served}/manifest.json").read())["format"] == "qwen-edge"
    for path in (f"/{PAGE_DIR}/src/artifact.js", "/../../etc/passwd", f"/{PAGE_DIR}/vendor/", "/nothing.bin"):
        assert _get(f"{served}{path}").status == 404, path


def test_web_bundle_holds_the_whole_page(tiny_artifact, tmp_path):
    result = package(tiny_artifact(), "web", tmp_path, license_id="Apache-2.0")
    report = verify_bundle(result.path)  # every page file is listed in bundle.json with its sha256
    with zipfile.ZipFile(result.path) as zf:
        names = set(zf.namelist())
        meta = json.loads(zf.read("bundle.json"))
        html = zf.read(f"{PAGE_DIR}/index.html").decode()
        modules = {n: zf.read(n).decode() for n in names if n.startswith(f"{PAGE_DIR}/") and n.endswith(".js")}
    assert report.files == len(names)
    assert {f"{PAGE_DIR}/{n}" for n in page_files()} <= set(meta["files"])
    assert any("chat page" in c for c in meta["checks"])
    # every file the import map and the page's relative imports name is in the bundle
    imports = json.loads(re.search(r'<script type="importmap">(.*?)</script>', html, re.S).group(1))["imports"]
    targets = {f"{PAGE_DIR}/{t.removeprefix('./')}" for t in imports.values()}
    for name, text in modules.items():
        for rel in re.findall(r"""from '(\.{1,2}/[^']+)'""", text):
            targets.add(posixpath.normpath(posixpath.join(posixpath.dirname(name), rel)))
    missing = sorted(t for t in targets if t not in names)
    assert not missing, missing
    assert len(targets) > len(imports)


def test_serve_web_refuses_a_folder_that_is_no_artifact(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--web", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest.json" in err
