"""The root of fedseal's exceptions.

Every error fedseal raises on purpose derives from :class:`FedsealError` and
carries a stable ``code`` (``area.what``), so a caller can tell errors apart
without parsing text, and a log line or a test can name the error it means.
The message says what to change.
"""

from __future__ import annotations


class FedsealError(Exception):
    """An error fedseal raises on purpose; ``code`` names it stably."""

    code: str = "fedseal.error"


class ModelError(FedsealError, ValueError):
    """A model cannot be loaded, or weights do not fit it (:mod:`fedseal.common.model` and the
    modules it builds on raise it; it lives here so they need not import each other)."""

    code = "model.error"


__all__ = ["FedsealError", "ModelError"]
