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

The error carries the path of the offending value (`prompts[2]`, `families`), so a
caller can name the field at fault. Costs stay linear in the text, at C speed where
it matters: the depth is measured on the text before parsing, and the parsed value
is walked only when the text has a \\u escape that could be a NUL or a surrogate.
Django-free and standard library only."""
from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64

__all__ = ["MAX_DEPTH", "JSONInputError", "check", "is_json_type", "loads", "path_text"]


def is_json_type(content_type: str) -> bool:
    """application/json, or a structured +json type (application/merge-patch+json):
    the media type alone, without parameters, lower case."""
    return content_type == "application/json" or (content_type.startswith("application/")
                                                    and content_type.endswith("+json"))


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


_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)
# A string runs to its closing quote, or to the end of an unterminated text: each
# quote starts at most one match, so these stay linear whatever the quoting.
_STRING = r'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)'
_STRINGS = re.compile(_STRING)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"\[\]|\{\}")
# \u escapes that may stand for a NUL or (half of) a surrogate pair: only these
# can put such characters into a parsed value (JSON refuses raw control characters,
# and UTF-8 text holds no surrogates).
_SUSPICIOUS = re.compile(r"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")
_SPACE = re.compile(r"[ \t\n\r]*")


def loads(raw: bytes | bytearray | memoryview | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse `raw` (UTF-8 bytes or text) and check the result (see the module doc).
    Raises JSONInputError."""
    maybe_surrogates = isinstance(raw, str) and _has_surrogates(raw)  # decoded UTF-8 has none
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONInputError(f"is not UTF-8 text (byte {exc.start})") from None
    if _deeper_than(raw, max_depth):
        raise JSONInputError(f"is nested deeper than {max_depth} levels", _deep_member(raw, max_depth))
    try:
        value = _DECODER.decode(raw)
    except RecursionError:  # not reached: _deeper_than refused it
        raise JSONInputError(f"is nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise JSONInputError(f"is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})") from None
    except JSONInputError as exc:  # NaN, Infinity or a number out of range
        raise JSONInputError(exc.reason, _refused_member(raw)) from None
    except ValueError as exc:  # an integer of more than sys.get_int_max_str_digits() digits
        raise JSONInputError(f"is not valid JSON ({exc})") from None
    if maybe_surrogates or _SUSPICIOUS.search(raw):
        check(value, max_depth=max_depth)
    return value


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _deeper_than(text: str, max_depth: int) -> bool:
    """Whether brackets outside strings nest deeper than `max_depth`: strings are cut
    out, then the innermost pairs peeled off a level at a time (regex passes, at most
    max_depth + 1 of them)."""
    if text.count("[") + text.count("{") <= max_depth:
        return False
    skeleton = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    if re.search(r"[\[{]{%d}" % (max_depth + 1), skeleton):  # that many opened in a row
        return True
    for _ in range(max_depth):
        peeled = _INNERMOST.sub("", skeleton)
        if peeled == skeleton:  # unbalanced, and no deeper: json.loads will say where
            return False
        skeleton = peeled
        if not skeleton:
            return False
    return bool(_INNERMOST.search(skeleton))


def _deep_member(text: str, max_depth: int) -> list[str | int]:
    """[key] or [index] of the top-level member that nests too deep, to name it."""
    def too_deep(start: int) -> tuple[bool, int]:
        try:
            _, end = _DECODER.scan_once(text, start)
        except RecursionError:
            return True, start
        return _deeper_than(text[start:end], max_depth - 1), end

    return _member_where(text, too_deep)


def _refused_member(text: str) -> list[str | int]:
    """[key] or [index] of the top-level member holding what the decoder refuses
    (NaN, Infinity, a number out of range), to name it."""
    def refused(start: int) -> tuple[bool, int]:
        try:
            _, end = _DECODER.scan_once(text, start)
        except JSONInputError:
            return True, start
        return False, end

    return _member_where(text, refused)


def _member_where(text: str, at_fault) -> list[str | int]:
    """[key] or [index] of the first top-level member of the object or array `text`
    whose value `at_fault(start)` finds at fault (it answers (at fault, the index
    after the value)); [] when the document is not an object or an array, or cannot
    be read that far."""
    index = _SPACE.match(text).end()
    if index >= len(text) or text[index] not in "[{":
        return []
    is_object, position = text[index] == "{", 0
    index += 1
    try:
        while True:
            index = _SPACE.match(text, index).end()
            key: str | int = position
            if is_object:
                key, index = _DECODER.scan_once(text, index)
                index = _SPACE.match(text, index).end()
                if text[index] != ":":
                    return []
                index = _SPACE.match(text, index + 1).end()
            fault, index = at_fault(index)
            if fault:
                return [key]
            index = _SPACE.match(text, index).end()
            if text[index] != ",":
                return []
            index, position = index + 1, position + 1
    except (StopIteration, IndexError, ValueError):
        return []


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
    parsed value (strings and object keys). Iterative: depth costs no stack. A
    container's path is kept as a linked (parent, key) pair and spelled out only for
    an error, so a long list costs no copying."""
    if isinstance(value, str):
        reason = _bad_text(value)
        if reason:
            raise JSONInputError(reason)
        return
    stack: list[tuple[Any, int, tuple | None]] = [(value, 1, None)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth, where = stack.pop()
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in pairs:
            if isinstance(key, str):
                reason = _bad_text(key)
                if reason:
                    raise JSONInputError(f"has a key that {reason}", _spelled(where))
            if isinstance(child, str):
                reason = _bad_text(child)
                if reason:
                    raise JSONInputError(reason, _spelled((where, key)))
            elif isinstance(child, (dict, list)):
                if depth >= max_depth:
                    raise JSONInputError(f"is nested deeper than {max_depth} levels", _spelled((where, key))[:8])
                if child:
                    stack.append((child, depth + 1, (where, key)))


def _spelled(where: tuple | None) -> list[str | int]:
    path: list[str | int] = []
    while where is not None:
        where, key = where
        path.append(key)
    return path[::-1]
