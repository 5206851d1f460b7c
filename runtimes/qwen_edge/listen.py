"""The HTTP listener both servers share (`serve`'s API, `serve --web`'s page): a threading server that
says in one line why it cannot listen and logs client errors on one line, a dropped connection not at all."""

from __future__ import annotations

import sys
from http.server import ThreadingHTTPServer

from .errors import QwenEdgeError


class Listener(ThreadingHTTPServer):
    """A threading HTTP server on (host, port) with `handler`; `label` names it in its log lines."""

    daemon_threads = True
    label = "qwen-edge serve"

    def __init__(self, host: str, port: int, handler):
        try:
            super().__init__((host, port), handler)
        except OSError as e:
            raise QwenEdgeError(
                f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host"
            ) from None

    def handle_error(self, request, client_address) -> None:
        """A client dropping its connection is routine; anything else is logged on one line."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            print(f"{self.label}: error with client {client_address[0]}: {error!r}", file=sys.stderr)

    @property
    def origin(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"
