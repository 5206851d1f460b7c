"""How a build talks to the person running it: one `Reporter` for status lines, progress bars,
warnings, the stream they go to and quiet mode.

A caller makes its Reporter current with ``use`` (a context variable: it holds for the ``with``
block and whatever it calls), and every module asks ``current()`` instead of taking progress or log
parameters. Without one, the default reports to sys.stderr. A new thread starts without the
caller's context: take ``current()`` in the caller and hand the Reporter over.

Quiet means nothing but errors: no status lines, no bars, no warnings, and the tools a build runs
are asked to be quiet too: pip, Olive, Optimum and the Hugging Face Hub by the modules that run them
(``reporter.verbose`` is False); Python warnings, transformers and the root logger by
``Reporter.hushed_libraries``, which the build pipeline enters.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import IO, Any

PREFIX = "qwen-edge"


class Reporter:
    """Status lines (``qwen-edge: message...``), warnings, plain lines and tqdm bars, all on one stream."""

    def __init__(self, *, quiet: bool = False, stream: IO[str] | None = None):
        self.quiet = quiet
        self._stream = stream

    @property
    def stream(self) -> IO[str]:
        """The stream everything goes to: the one given, else sys.stderr as it is when written to."""
        return self._stream if self._stream is not None else sys.stderr

    @property
    def verbose(self) -> bool:
        """Whether tools run by the build may show their own progress and logs."""
        return not self.quiet

    def with_quiet(self, quiet: bool) -> Reporter:
        """This Reporter's stream with another quiet mode."""
        return Reporter(quiet=quiet, stream=self._stream)

    def line(self, text: str) -> None:
        """One line as it is (a summary, a result), unless quiet."""
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def status(self, message: str) -> None:
        """What the build is doing now: ``qwen-edge: message...``."""
        self.line(f"{PREFIX}: {message}...")

    def warning(self, message: str) -> None:
        """Something the build went on without: ``qwen-edge: warning: message``."""
        self.line(f"{PREFIX}: warning: {message}")

    def bar(self, iterable=None, **options: Any):
        """A tqdm progress bar on the stream (``options`` as tqdm takes them), disabled when quiet."""
        from tqdm import tqdm

        disable = options.pop("disable", False) or self.quiet
        return tqdm(iterable, file=self.stream, disable=disable, **options)

    @contextmanager
    def hushed_libraries(self) -> Iterator[None]:
        """When quiet, for the ``with`` block: Python warnings and transformers' progress bars and log
        messages off, and what is logged on the root logger itself below ERROR dropped
        (onnxruntime.quantization warns there with ``logging.warning``; named loggers are left alone).
        Restored after."""
        with ExitStack() as undo:
            if self.quiet:
                undo.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
                root = logging.getLogger()
                root.addFilter(_errors_only)
                undo.callback(root.removeFilter, _errors_only)
                _hush_transformers(undo)
            yield


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def _hush_transformers(undo: ExitStack) -> None:
    """transformers' log messages and progress bars off until `undo` closes (if it is installed)."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    undo.callback(transformers_logging.set_verbosity, transformers_logging.get_verbosity())
    transformers_logging.set_verbosity_error()
    if transformers_logging.is_progress_bar_enabled():
        transformers_logging.disable_progress_bar()
        undo.callback(transformers_logging.enable_progress_bar)
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_loader
    except ImportError:  # no gguf package, so no GGUF source either
        return
    # The GGUF loader draws its tensor bar with tqdm directly, not through the switch above.
    bar = getattr(gguf_loader, "tqdm", None)
    if bar is not None:
        gguf_loader.tqdm = functools.partial(bar, disable=True)
        undo.callback(setattr, gguf_loader, "tqdm", bar)


_DEFAULT = Reporter()
_CURRENT: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("edge_reporter", default=None)


def current() -> Reporter:
    """The Reporter made current by the innermost ``use``, else the default (not quiet, sys.stderr)."""
    return _CURRENT.get() or _DEFAULT


@contextmanager
def use(reporter: Reporter) -> Iterator[Reporter]:
    """Make `reporter` current for the ``with`` block."""
    token = _CURRENT.set(reporter)
    try:
        yield reporter
    finally:
        _CURRENT.reset(token)
