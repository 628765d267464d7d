"""Where keys are in a TOML text: tomllib keeps no positions, so we scan for them.

Good enough for operators' files (tables, arrays of tables, dotted and quoted keys,
multi-line strings skipped); every Problem gets the line of its key or nearest table.
"""

from __future__ import annotations

import re

Path = tuple[str | int, ...]

_PART = r"(?:[A-Za-z0-9_-]+|\"(?:[^\"\\]|\\.)*\"|'[^']*')"
_DOTTED = rf"{_PART}(?:\s*\.\s*{_PART})*"
_HEADER = re.compile(rf"\s*(\[\[?)\s*({_DOTTED})\s*\]\]?\s*(?:#.*)?")
_ASSIGN = re.compile(rf"\s*({_DOTTED})\s*=")
_KEY_PART = re.compile(r"\s*(?:([A-Za-z0-9_-]+)|\"((?:[^\"\\]|\\.)*)\"|'([^']*)')\s*\.?")


def _key_path(text: str) -> tuple[str, ...]:
    """A TOML dotted key (a."b.c".d) as its parts; only called on text matching _DOTTED."""
    return tuple(
        next(group for group in match.groups() if group is not None)
        for match in _KEY_PART.finditer(text)
    )


class Locator:
    """Line numbers of tables and keys, found by scanning the text (tomllib keeps none)."""

    def __init__(self, text: str) -> None:
        self._lines: dict[Path, int] = {}
        self._arrays: dict[Path, int] = {}
        self.repeated: int | None = None  # first line that sets a key or table a second time
        table: Path = ()
        quote = None
        for number, line in enumerate(text.splitlines(), 1):
            if quote is None:
                table = self._scan(line, number, table)
            for mark in ('"""', "'''"):
                if line.count(mark) % 2 and quote in (None, mark):
                    quote = None if quote else mark

    def _scan(self, line: str, number: int, table: Path) -> Path:
        header = _HEADER.fullmatch(line)
        if header:
            path = _key_path(header[2])
            table = self._resolve(path[:-1]) + (path[-1],)
            if header[1] == "[[":
                self._arrays[table] = self._arrays.get(table, -1) + 1
            elif table in self._lines:
                self._repeat(number)
            if table in self._arrays:
                table += (self._arrays[table],)
            self._note(table, number)
            return table
        assign = _ASSIGN.match(line)
        if assign:
            key = table + _key_path(assign[1])
            if key in self._lines:
                self._repeat(number)
            self._note(key, number)
        return table

    def _repeat(self, number: int) -> None:
        if self.repeated is None:
            self.repeated = number

    def _resolve(self, path: tuple[str, ...]) -> Path:
        resolved: Path = ()
        for part in path:
            resolved += (part,)
            if resolved in self._arrays:
                resolved += (self._arrays[resolved],)
        return resolved

    def _note(self, path: Path, number: int) -> None:
        for end in range(1, len(path) + 1):
            self._lines.setdefault(path[:end], number)

    def line(self, path: Path) -> int | None:
        """The line of ``path``, or of its nearest enclosing table that has one."""
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return None


def dotted(path: Path) -> str:
    """A path as operators write it: listener[0].endpoint, domains."example.org".users."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            plain = re.fullmatch(r"[A-Za-z0-9_-]+", part) is not None
            text += ("." if text else "") + (part if plain else f'"{part}"')
    return text
