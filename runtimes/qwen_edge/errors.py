"""Errors that reach the user as one clear line."""


class QwenEdgeError(Exception):
    """An error the CLI prints as a single line, with what to do about it, and exits 2."""


class ArtifactError(QwenEdgeError):
    """A missing, truncated, altered or incompatible artifact."""


class ContextOverflowError(QwenEdgeError):
    """A prompt or conversation that does not fit the artifact's context length."""


class RuntimeMissingError(QwenEdgeError):
    """A missing execution provider or optional runtime component."""
