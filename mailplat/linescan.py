"""The two scans DATA makes over every byte of a message: line endings and lengths, and line
starts with a dot.

Each function is written here in Python and, when the package could be built with a C
compiler, replaced by the same function from ``mailplat._linescan``: these scans are most of
the reactor's CPU for a large message (about 3 ms per MB in Python, under 0.2 ms compiled). The
Python versions define the behaviour; tests/test_linescan.py holds the compiled ones to it.
``COMPILED`` says which are in use; ``python_check`` and ``python_find_line_dot`` stay
reachable for the tests.
"""

from __future__ import annotations

MAX_LINE = 1000  # RFC 5321 §4.5.3.1.6: text line, CRLF included


def python_check(raw: bytes, line_length: int, pending_cr: bool) -> tuple[bool, bool, int, bool]:
    """Judge one chunk of message bytes that follows ``line_length`` bytes of an unfinished
    line (``pending_cr`` if the last of them was a CR).

    Returns (bare, overlong, line_length, pending_cr): whether a CR not followed by LF or an LF
    not preceded by CR was seen, whether a line reached MAX_LINE octets, and the state to pass
    with the next chunk. A CR at the very end is judged with the next chunk.
    """
    crlf = raw.count(b"\r\n")
    lone_lf = raw.count(b"\n") - crlf
    lone_cr = raw.count(b"\r") - crlf
    if pending_cr and raw:
        if raw[:1] == b"\n":
            lone_lf -= 1  # the LF completes the CR left over from the previous chunk
        else:
            lone_cr += 1
    ends_with_cr = raw[-1:] == b"\r" if raw else pending_cr
    if raw and ends_with_cr:
        lone_cr -= 1  # judged with the next chunk
    first_lf = raw.find(b"\n")
    head = len(raw) if first_lf < 0 else first_lf
    overlong = line_length + head >= MAX_LINE or _has_long_line(raw)
    last_lf = raw.rfind(b"\n")
    line_length = line_length + len(raw) if last_lf < 0 else len(raw) - last_lf - 1
    return bool(lone_lf or lone_cr), overlong, line_length, ends_with_cr


def _has_long_line(raw: bytes) -> bool:
    """Whether the chunk holds MAX_LINE bytes without an LF. Each step jumps to the last LF
    of the next MAX_LINE bytes (memrchr in C), so an ordinary chunk costs a few dozen calls
    and no allocation, where splitting it into lines would make one object per line."""
    start = 0
    for _ in range(len(raw)):  # bounded; each round moves start forward by at least one
        if start + MAX_LINE > len(raw):
            return False
        last_lf = raw.rfind(b"\n", start, start + MAX_LINE)
        if last_lf < 0:
            return True
        start = last_lf + 1
    return False


def python_find_line_dot(data: bytes, start: int = 0) -> int:
    """Index of the first CR LF "." in data[start:], or -1: where DATA may end or a dot was
    stuffed."""
    return data.find(b"\r\n.", start)


check = python_check
find_line_dot = python_find_line_dot
try:
    from mailplat import _linescan
except ImportError:  # built without a C compiler: the Python versions above serve
    COMPILED = False
else:
    check, find_line_dot = _linescan.check, _linescan.find_line_dot
    COMPILED = True
