"""The one error type of spec parsing: it names the field so a 400 says what to fix."""

from __future__ import annotations


class SpecError(ValueError):
    """A bad spec; ``path`` is the dotted field path (``ports[1].target``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(path, message)
        self.path = path
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def under(self, prefix: str) -> SpecError:
        """The same error seen from an enclosing document (``services.web``)."""
        if not prefix:
            return self
        if not self.path:
            return SpecError(prefix, self.message)
        sep = "" if self.path.startswith("[") else "."
        return SpecError(f"{prefix}{sep}{self.path}", self.message)


def show(value: object, limit: int = 40) -> str:
    """A value for an error message: short, and safe for huge numbers."""
    try:
        text = repr(value)
    except ValueError:
        return f"a {type(value).__name__} too large to print"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def join(path: str, key: str | int) -> str:
    """Extend a field path by a key or a list index."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key
