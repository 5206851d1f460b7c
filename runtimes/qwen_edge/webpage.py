"""The browser chat page: its static files, and `qwen-edge serve --web` (the page + an artifact folder, static).

The page is runtimes/js/web (index.html, app.js, sw.js), the JavaScript runtime's isomorphic modules (src/,
all but those importing node: or onnxruntime-node) and the browser builds of its npm dependencies
(runtimes/js/node_modules, from `npm ci`). It sits in the folder `web/` beside the model files it loads
from "../": so in a `web` bundle, and so here.
"""

from __future__ import annotations

import mimetypes
import posixpath
import re
import sys
from functools import partial
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

from .errors import QwenEdgeError
from .listen import Listener

JS_DIR = Path(__file__).resolve().parents[1] / "js"
PAGE_DIR = "web"
_NODE_IMPORT = re.compile(r"""^import .* from '(node:|onnxruntime-node)""", re.M)  # a module only Node can load
_VENDOR = {  # page path -> runtimes/js path: the import map of index.html names these
    "vendor/onnxruntime-web/ort.bundle.min.mjs": "node_modules/onnxruntime-web/dist/ort.bundle.min.mjs",
    "vendor/onnxruntime-web/ort-wasm-simd-threaded.jsep.mjs": (
        "node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.jsep.mjs"
    ),
    "vendor/onnxruntime-web/ort-wasm-simd-threaded.jsep.wasm": (
        "node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.jsep.wasm"
    ),
    "vendor/huggingface-tokenizers/tokenizers.min.mjs": "node_modules/@huggingface/tokenizers/dist/tokenizers.min.mjs",
    "vendor/huggingface-jinja/index.js": "node_modules/@huggingface/jinja/dist/index.js",
    "vendor/pure-rand/uniformFloat64.js": "node_modules/pure-rand/lib/esm/distribution/uniformFloat64.js",
    "vendor/pure-rand/xoroshiro128plus.js": "node_modules/pure-rand/lib/esm/generator/xoroshiro128plus.js",
}
# Cross-origin isolation: what lets onnxruntime-web use threads (SharedArrayBuffer).
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}


def page_files() -> dict[str, Path]:
    """{path inside the page folder: source file}, sorted; one-line error when a file is missing."""
    if not (JS_DIR / "web" / "index.html").is_file():
        raise QwenEdgeError(f"the chat page is not at {JS_DIR / 'web'}; run qwen-edge from its source checkout")
    files = {p.name: p for p in (JS_DIR / "web").iterdir() if p.is_file()}
    files |= {
        f"src/{p.name}": p
        for p in (JS_DIR / "src").glob("*.js")
        if p.name != "index.js" and not _NODE_IMPORT.search(p.read_text(encoding="utf-8"))  # index.js: Node's entry
    }
    files |= {name: JS_DIR / source for name, source in _VENDOR.items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise QwenEdgeError(f"{missing[0]} is missing; run `npm ci` in {JS_DIR} to install the page's libraries")
    return dict(sorted(files.items()))


class _Handler(SimpleHTTPRequestHandler):
    """Static files: /web/* from the page, everything else from the artifact folder; isolation headers on all."""

    extensions_map = {
        **mimetypes.types_map,
        ".mjs": "text/javascript",
        ".js": "text/javascript",
        ".wasm": "application/wasm",
    }

    def __init__(self, *args, page: dict[str, Path], quiet: bool, **kwargs):
        self.page, self.quiet = page, quiet
        super().__init__(*args, **kwargs)

    def translate_path(self, path: str) -> str:
        clean = posixpath.normpath(path.split("?", 1)[0].split("#", 1)[0]).lstrip("/")
        name = "index.html" if clean == PAGE_DIR else clean.removeprefix(f"{PAGE_DIR}/")
        if (clean == PAGE_DIR or clean.startswith(f"{PAGE_DIR}/")) and name in self.page:
            return str(self.page[name])
        return super().translate_path(path)

    def send_head(self):
        if self.path.split("?", 1)[0] in ("/", f"/{PAGE_DIR}"):  # the page loads its files relative to /web/
            self.send_response(302)
            self.send_header("Location", f"/{PAGE_DIR}/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return super().send_head()

    def list_directory(self, path):
        self.send_error(404, "no such file")

    def end_headers(self):
        for name, value in ISOLATION_HEADERS.items():
            self.send_header(name, value)
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format, *args):
        if not self.quiet:
            print(f"qwen-edge serve --web: {self.address_string()} {format % args}", file=sys.stderr)


class WebServer(Listener):
    """Serves the chat page at /web/ and the artifact folder (or unpacked web bundle) `root` at /."""

    label = "qwen-edge serve --web"

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False):
        handler = partial(_Handler, directory=str(Path(root).resolve()), page=page_files(), quiet=quiet)
        super().__init__(host, port, handler)

    @property
    def url(self) -> str:
        return f"{self.origin}/{PAGE_DIR}/"
