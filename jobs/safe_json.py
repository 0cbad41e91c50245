"""JSON from outside (API bodies, a prompts file's lines, a dataset's lines, a model's
config.json) parsed into values the rest of the code can store and walk.

One parser for every place hostile JSON arrives, so each refuses the same things
with the same sentence:

- not UTF-8, or not JSON (NaN and Infinity included: they are not JSON);
- nested deeper than MAX_DEPTH (a body of tens of thousands of `[` would otherwise
  blow Python's recursion limit);
- a NUL character (U+0000) anywhere, in a value or a key (PostgreSQL cannot store
  it in text or JSON, and no prompt or name needs one);
- a lone surrogate (`"\\ud800"`): not a character, and not storable as UTF-8.

The error carries the path of the offending value (`prompts[2]`,
`families.trn1.borrow_limit`), so a caller can name the field at fault.
Django-free and standard library only."""
from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64

__all__ = ["MAX_DEPTH", "JSONInputError", "check", "loads", "path_text"]


class JSONInputError(ValueError):
    """Refused JSON. `path` holds the keys / indexes of the value at fault ([] for
    the document as a whole); `reason` is a predicate ("is nested deeper than 64
    levels", "contains a NUL character ..."), so a caller can say what was refused:
    sentence("line 2") is "line 2 is not valid JSON (...)"."""

    def __init__(self, reason: str, path: list[str | int] | None = None):
        self.reason = reason
        self.path = list(path or [])
        super().__init__(self.sentence("the JSON"))

    def sentence(self, subject: str) -> str:
        where = path_text(self.path)
        return f"{subject}: {where} {self.reason}" if where else f"{subject} {self.reason}"

    @property
    def field(self) -> str | None:
        """The top-level key at fault, if the fault is inside an object's value."""
        return self.path[0] if self.path and isinstance(self.path[0], str) else None


def path_text(path: list[str | int]) -> str:
    """`families.trn1.borrow_limit`, `prompts[2]` (long keys cut to 40 characters)."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part[:40]}" if text else part[:40])
    return text


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONInputError(f"holds a number out of range ({text[:40]})")
    return value


def _no_constant(name: str):
    raise JSONInputError(f"holds {name}, which is not JSON")


def loads(raw: bytes | bytearray | memoryview | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse `raw` (UTF-8 bytes or text) and check the result (see the module doc).
    Raises JSONInputError."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONInputError(f"is not UTF-8 text (byte {exc.start})") from None
    try:
        value = json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise JSONInputError(f"is nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise JSONInputError(f"is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})") from None
    except JSONInputError:
        raise
    except ValueError as exc:  # an integer of more than sys.get_int_max_str_digits() digits
        raise JSONInputError(f"is not valid JSON ({exc})") from None
    check(value, max_depth=max_depth)
    return value


def _bad_text(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (U+0000), which cannot be stored"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate (U+{ord(text[exc.start]):04X}), which is not a character"
    return None


def check(value: Any, *, max_depth: int = MAX_DEPTH) -> None:
    """Refuse too-deep nesting, NUL characters and lone surrogates in an already
    parsed value (strings and object keys). Iterative: depth costs no stack."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            reason = _bad_text(item)
            if reason:
                raise JSONInputError(reason, path)
        elif isinstance(item, (dict, list)):
            if len(path) >= max_depth:
                raise JSONInputError(f"is nested deeper than {max_depth} levels", path[:8])
            if isinstance(item, dict):
                for key, child in item.items():
                    if isinstance(key, str):
                        reason = _bad_text(key)
                        if reason:
                            raise JSONInputError(f"has a key that {reason}", path)
                    stack.append((child, [*path, key]))
            else:
                stack.extend((child, [*path, i]) for i, child in enumerate(item))
