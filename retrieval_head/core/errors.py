"""The one base class of every error the package raises on purpose, so a caller can catch them all."""


class RetrievalHeadError(Exception):
    """Base of retrieval-head's own errors; each also derives from the builtin it refines (`ValueError`, ...)."""
