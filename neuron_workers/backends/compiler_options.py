"""Allow-list validation of user-supplied neuronx-cc options, and the compile cache key.

Pure functions, no torch, no Django: the web app calls them at submit time and the
neuron backend calls them again right before tracing.

Options are only ever returned as argv pieces for `torch_neuronx.trace(...,
compiler_args=[...])`; they never pass through a shell. We still refuse shell
syntax outright, so that a hostile string is rejected with a clear reason instead
of being quietly handed to the compiler as a strange argument.

Flag names, values and target restrictions follow neuronx-cc's reference
(neuron.md §4.5). Flags that choose where the compiler writes (`-o`, `--output`,
`--logfile`) or what it targets (`--target`) are refused: NeuronDeck owns those.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence

# flag -> allowed values [SDK compiler/neuronx-cc/api-reference-guide/index.rst, neuron.md §4.5].
_VALUED_FLAGS: dict[str, tuple[str, ...]] = {
    "--model-type": ("generic", "transformer", "unet-inference"),
    "--auto-cast": ("none", "matmult", "all"),
    "--auto-cast-type": ("bf16", "fp16", "tf32", "fp8_e4m3"),
    "--optlevel": ("1", "2", "3"),
    "--logical-nc-config": ("1", "2"),
    "--distribution-strategy": ("llm-training",),
    "--native-int64": ("default", "enabled", "disabled"),
    # Also a comma-separated list of the operations below (_DOWNCAST_OPS).
    "--implicit-integer-downcast": ("default", "all", "none"),
    "--verbose": ("debug", "info", "warning", "error", "critical"),
}

# --implicit-integer-downcast <op_list>: operations that may be downcast.
_DOWNCAST_OPS: tuple[str, ...] = ("dot", "scatter", "all_reduce", "reduce_scatter", "pow")

_BOOLEAN_FLAGS: tuple[str, ...] = (
    "--enable-saturate-infinity",
    "--enable-fast-loading-neuron-binaries",
    "--enable-fast-context-switch",
    "--enable-mixed-precision-accumulation",
    "--disable-mixed-precision-accumulation",
)

# "-lnc" is the reference's short form; "--lnc" is how the error-code and profiling
# guides spell it (compiler/error-codes/EARG001.rst, nki/guides/use-neuron-profile.rst).
_ALIASES: dict[str, str] = {"-lnc": "--logical-nc-config", "--lnc": "--logical-nc-config"}

# Flags valid only on some targets: logical cores and native int64 exist on trn2
# only; saturate-infinity is needed on trn1, accepted and without effect on trn2,
# and inf2 has trn1's NeuronCore-v2, so it is harmless there too.
_TARGET_ONLY: dict[str, tuple[str, ...]] = {
    "--logical-nc-config": ("trn2",),
    "--native-int64": ("trn2",),
    "--enable-saturate-infinity": ("inf2", "trn1", "trn2"),
}

# Pairs that contradict each other; giving both is a user error, not "last wins".
_CONFLICTS: tuple[tuple[str, str], ...] = (
    ("--enable-mixed-precision-accumulation", "--disable-mixed-precision-accumulation"),
)

# Known neuronx-cc flags we refuse on purpose, with the reason shown to the user.
_REFUSED: dict[str, str] = {
    "-o": "the output location is chosen by NeuronDeck",
    "--output": "the output location is chosen by NeuronDeck",
    "--logfile": "the compile log location is chosen by NeuronDeck",
    "--target": "the target comes from the job's target field",
    "--framework": "the framework is set by torch-neuronx",
    "--cache_dir": "the compile cache is configured by the host",
    "--compiler-workdir": "the compiler work directory is chosen by NeuronDeck",
}

TARGETS: tuple[str, ...] = ("cpu", "inf2", "trn1", "trn2")
MAX_OPTIONS = 32
MAX_OPTION_LENGTH = 200

_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_.=,-]+$")
# A comma is allowed: it separates --implicit-integer-downcast's operations, and
# the value check refuses it anywhere else.
_SHELL_CHARS = set(";|&$`<>()[]{}*?!~#'\"\\/\n\r\t %^:@")
_OPTLEVEL_SHORT = re.compile(r"^-O(.*)$")


class CompilerOptionError(ValueError):
    """A compiler option was refused; the message names the option and the reason."""


def validate_compiler_options(options: Sequence[str], target: str) -> list[str]:
    """Check `options` against the allow-list and return normalized argv pieces.

    Accepts "--flag=value", "--flag value" (one item or two), "-O1".."-O3", "-O N",
    "-lnc N" and "--lnc N". Output is canonical: one "--flag=value" or "--flag" piece per option,
    in the order given, with aliases expanded ("-O2" -> "--optlevel=2").
    Blank items are ignored. Raises CompilerOptionError on anything else.
    """
    if target not in TARGETS:
        raise CompilerOptionError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    if isinstance(options, (str, bytes)) or not isinstance(options, Sequence):
        raise CompilerOptionError("compiler options must be a list of strings, not a single string")
    if len(options) > MAX_OPTIONS:
        raise CompilerOptionError(f"too many compiler options ({len(options)}); at most {MAX_OPTIONS}")
    tokens = _tokenize(options)
    normalized: list[str] = []
    seen: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        item, token = tokens[i]
        flag, value, consumed = _parse_flag(tokens, i)
        _check_target(item, flag, target)
        if flag in seen:
            raise CompilerOptionError(
                f"compiler option {item!r}: {flag} is given more than once (also as {seen[flag]!r})"
            )
        seen[flag] = item
        normalized.append(flag if value is None else f"{flag}={value}")
        i += consumed
    _check_conflicts(seen)
    return normalized


def _tokenize(options: Sequence[str]) -> list[tuple[str, str]]:
    """Split items on whitespace into (original item, token) pairs, refusing shell syntax.

    Plain `str.split()`, not shlex: quoting has no meaning here, and a quote
    character is itself refused below. Refused flags are reported before
    special characters so "-o /tmp/x" is explained as "-o is not allowed".
    """
    tokens: list[tuple[str, str]] = []
    for item in options:
        if not isinstance(item, str):
            raise CompilerOptionError(f"compiler option {item!r} is not a string")
        if len(item) > MAX_OPTION_LENGTH:
            raise CompilerOptionError(f"compiler option {item[:40]!r}... is longer than {MAX_OPTION_LENGTH} characters")
        parts = item.split()
        for part in parts:
            _refuse_known_flag(item, part)
            if part.startswith("@"):
                raise CompilerOptionError(f"compiler option {item!r}: response files (@file) are not allowed")
        bad = sorted({c for c in item if c in _SHELL_CHARS and not c.isspace()} | _control_chars(item))
        if bad:
            shown = " ".join(repr(c) for c in bad)
            raise CompilerOptionError(
                f"compiler option {item!r} contains {shown}: shell syntax, paths and special characters are refused"
            )
        tokens.extend((item, part) for part in parts)
    return tokens


def _refuse_known_flag(item: str, token: str) -> None:
    name = token.partition("=")[0]
    if name in _REFUSED:
        raise CompilerOptionError(f"compiler option {item!r}: {name} is not allowed, {_REFUSED[name]}")


def _control_chars(item: str) -> set[str]:
    return {c for c in item if (ord(c) < 32 and c not in " \t") or ord(c) == 127}


def _parse_flag(tokens: list[tuple[str, str]], i: int) -> tuple[str, str | None, int]:
    """Parse the flag at tokens[i]; return (canonical flag, value or None, tokens consumed)."""
    item, token = tokens[i]
    if not token.startswith("-"):
        raise CompilerOptionError(f"compiler option {item!r}: {token!r} is not a flag (values must follow their flag)")
    if not _SAFE_TOKEN.match(token):
        raise CompilerOptionError(f"compiler option {item!r}: {token!r} has characters that are not allowed")
    short = _OPTLEVEL_SHORT.match(token)
    if short and short.group(1):
        return "--optlevel", _check_value(item, "--optlevel", short.group(1), hint="use -O1, -O2 or -O3"), 1
    if short:  # "-O 1": the reference's spelling, "-O <opt_level>"
        if i + 1 >= len(tokens) or tokens[i + 1][1].startswith("-"):
            raise CompilerOptionError(f"compiler option {item!r}: -O needs a level (use -O1, -O2 or -O3)")
        return "--optlevel", _check_value(item, "--optlevel", tokens[i + 1][1], hint="use -O1, -O2 or -O3"), 2
    name, eq, inline_value = token.partition("=")
    flag = _ALIASES.get(name, name)
    if flag in _BOOLEAN_FLAGS:
        if eq:
            raise CompilerOptionError(f"compiler option {item!r}: {flag} takes no value")
        return flag, None, 1
    if flag not in _VALUED_FLAGS:
        raise CompilerOptionError(
            f"compiler option {item!r}: unknown or unsupported flag {name!r}; allowed: {_allowed_summary()}"
        )
    if eq:
        return flag, _check_value(item, flag, inline_value), 1
    if i + 1 >= len(tokens) or tokens[i + 1][1].startswith("-"):
        choices = ", ".join(_VALUED_FLAGS[flag])
        raise CompilerOptionError(f"compiler option {item!r}: {name} needs a value, one of {choices}")
    return flag, _check_value(item, flag, tokens[i + 1][1]), 2


def _check_value(item: str, flag: str, value: str, hint: str = "") -> str:
    allowed = _VALUED_FLAGS[flag]
    if flag == "--implicit-integer-downcast" and value not in allowed:
        ops = value.split(",")
        if all(op in _DOWNCAST_OPS for op in ops) and len(set(ops)) == len(ops):
            return value
        hint = hint or f"or a comma-separated list of {', '.join(_DOWNCAST_OPS)}"
    if value not in allowed:
        extra = f" ({hint})" if hint else ""
        raise CompilerOptionError(
            f"compiler option {item!r}: value {value!r} for {flag} is not one of {', '.join(allowed)}{extra}"
        )
    return value


def _check_target(item: str, flag: str, target: str) -> None:
    targets = _TARGET_ONLY.get(flag)
    if targets and target not in targets:
        raise CompilerOptionError(
            f"compiler option {item!r}: {flag} only applies to target {' or '.join(targets)}, not {target}"
        )


def _check_conflicts(seen: dict[str, str]) -> None:
    for a, b in _CONFLICTS:
        if a in seen and b in seen:
            raise CompilerOptionError(f"compiler options {seen[a]!r} and {seen[b]!r} contradict each other")


def _allowed_summary() -> str:
    return ", ".join([*_VALUED_FLAGS, "-O1/-O2/-O3", "-lnc/--lnc", *_BOOLEAN_FLAGS])


def compile_cache_key(
    model_digest: str,
    batch_size: int,
    sequence_length: int,
    options: Sequence[str],
    backend: str,
    compiler_version: str,
    target: str,
    extras: dict | None = None,
) -> str:
    """sha256 hex of a canonical JSON of everything that determines a compiled artifact.

    Options are validated and sorted first, so "-O1" and "--optlevel 1" (or a
    different order of independent flags) give the same key. The leading "v"
    field lets a future change of artifact layout invalidate old keys. `extras` are
    the export options beyond the defaults (export_options.ExportOptions.key_extras:
    task, tensor-parallel size, auto-cast, image shape); absent when empty, so a
    plain text-generation compile keeps the key it had before they existed.
    """
    canonical = {
        "v": 1,
        "model_digest": model_digest,
        "batch_size": int(batch_size),
        "sequence_length": int(sequence_length),
        "options": sorted(validate_compiler_options(options, target)),
        "backend": backend,
        "compiler_version": compiler_version,
        "target": target,
    }
    if extras:
        canonical["export"] = dict(extras)
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
