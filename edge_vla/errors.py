"""User-facing errors.

Every problem a user can fix (a bad path, a malformed file, an input of the wrong shape)
raises `EdgeVLAError` with one line that names the thing and the fix. The CLI prints that
line and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class EdgeVLAError(Exception):
    """A problem the user can fix; the message says what, where and how."""

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(what if not fix else f"{what} — {fix}")


class MissingDependencyError(EdgeVLAError):
    """An optional backend is not installed or cannot run on this machine."""

    def __init__(self, package: str, feature: str, install: str | None = None):
        fix = install or f"install it with `pip install {package}`"
        super().__init__(f"{feature} needs `{package}`, which is not usable here", fix)
