"""The project's own errors. The CLI prints any of them as one line (``--debug`` shows the traceback)."""


class ClipgenError(Exception):
    """An error whose message names what is wrong and how to fix it; a traceback would add nothing."""


class ConfigError(ClipgenError, ValueError):
    """A pipeline config that cannot be used. The message names the key and the fix."""


class IngestError(ClipgenError, RuntimeError):
    """An ingest that cannot produce a dataset. The message names the input and the fix."""
