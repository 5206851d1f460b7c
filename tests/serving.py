"""A server under test: serve_forever on a daemon thread, shut down and closed afterwards."""

from __future__ import annotations

import threading
from contextlib import contextmanager


@contextmanager
def serving(server):
    """Run `server` (a ThreadingHTTPServer) in the background for the `with` block; yield it."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
