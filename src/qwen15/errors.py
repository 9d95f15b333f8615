"""Errors caused by the user's input: the CLI prints their message (file, line or key, and what to do), no traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Base of every error a user can act on; subclasses name the part of the toolkit that raised it."""
