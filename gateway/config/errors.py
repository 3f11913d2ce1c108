"""Config errors: every one names the file, the line and the key path."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConfigError:
    """One problem in a config file.

    ``line`` is 1-based (None when the problem has no place in the file, e.g. it cannot be read);
    ``path`` is the key path such as ``routes[0].upstream`` ("" for the document itself).
    """

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        # Same shape as compilers and `nginx -t`: editors can jump to file:line.
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"


def _order(error: ConfigError) -> tuple[bool, int]:
    return (error.line is None, error.line or 0)


def sort_errors(errors: Iterable[ConfigError]) -> list[ConfigError]:
    """File order (stable), errors without a line last."""
    return sorted(errors, key=_order)


def format_errors(errors: Iterable[ConfigError]) -> str:
    """One error per line, in file order; what `gateway check` prints."""
    return "\n".join(str(e) for e in sort_errors(errors))


class ConfigInvalid(Exception):
    """The config could not be loaded; ``errors`` holds every problem found."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors: list[ConfigError] = sort_errors(errors)
        super().__init__(format_errors(self.errors))
