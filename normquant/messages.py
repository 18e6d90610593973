"""Short, one-line renderings of values and messages for errors (a leaf module: imports nothing of normquant).

Error messages echo what the user wrote, so a 13 MB value must not become a 13 MB message:

>>> show("x" * 10_000)
"'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx…' (10,000 characters)"
>>> one_line("first\\n  second")
'first second'
"""
from __future__ import annotations

import re

#: longest error message the CLI prints (characters)
MAX_MESSAGE = 600
#: longest echo of a user value inside a message
MAX_VALUE = 60


def show(value, limit: int = MAX_VALUE) -> str:
    """``repr(value)``, cut to about ``limit`` characters (with the full length) when longer; never raises."""
    try:
        if isinstance(value, (str, bytes)) and len(value) > limit:
            return f"{value[:limit - 8]!r}"[:-1] + f"…{repr(value)[-1]} ({len(value):,} characters)"
        text = repr(value)
    except Exception:  # a __repr__ that fails, a RecursionError on a self-referencing list...
        return f"<{type(value).__name__}>"
    if len(text) > limit:
        return f"{text[:limit]}… ({type(value).__name__}, {len(text):,} characters)"
    return text


def one_line(text: object, limit: int = MAX_MESSAGE) -> str:
    """``str(text)`` on one line (whitespace runs collapsed) and at most about ``limit`` characters: the middle of
    a longer message is cut out, so its start (what failed) and end (what to do) stay readable."""
    try:
        s = str(text)
    except Exception:
        s = f"<{type(text).__name__}>"
    s = re.sub(r"\s+", " ", s).strip()
    if len(s) <= limit:
        return s
    keep = limit - 40
    return f"{s[:keep * 2 // 3]} … [{len(s) - keep:,} characters cut] … {s[-(keep - keep * 2 // 3):]}"
