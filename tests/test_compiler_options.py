"""neuronx-cc option allow-list and compile cache key (pure; no torch, no Django)."""

from __future__ import annotations

import pytest

from neuron_workers.backends.compiler_options import (
    CompilerOptionError,
    compile_cache_key,
    validate_compiler_options,
)

ALLOWED = [
    # (options as a user may type them, target, normalized argv pieces)
    (["--model-type=generic"], "inf2", ["--model-type=generic"]),
    (["--model-type", "transformer"], "inf2", ["--model-type=transformer"]),
    (["--model-type unet-inference"], "trn1", ["--model-type=unet-inference"]),
    (["--auto-cast=none"], "inf2", ["--auto-cast=none"]),
    (["--auto-cast", "matmult"], "inf2", ["--auto-cast=matmult"]),
    (["--auto-cast all"], "trn2", ["--auto-cast=all"]),
    (["--auto-cast-type=bf16"], "inf2", ["--auto-cast-type=bf16"]),
    (["--auto-cast-type", "fp16"], "inf2", ["--auto-cast-type=fp16"]),
    (["--auto-cast-type tf32"], "trn1", ["--auto-cast-type=tf32"]),
    (["--auto-cast-type=fp8_e4m3"], "trn2", ["--auto-cast-type=fp8_e4m3"]),
    (["--optlevel=1"], "inf2", ["--optlevel=1"]),
    (["--optlevel", "2"], "inf2", ["--optlevel=2"]),
    (["--optlevel 3"], "inf2", ["--optlevel=3"]),
    (["-O1"], "inf2", ["--optlevel=1"]),
    (["-O2"], "trn1", ["--optlevel=2"]),
    (["-O3"], "trn2", ["--optlevel=3"]),
    (["--logical-nc-config=1"], "trn2", ["--logical-nc-config=1"]),
    (["--logical-nc-config", "2"], "trn2", ["--logical-nc-config=2"]),
    (["-lnc=1"], "trn2", ["--logical-nc-config=1"]),
    (["-lnc", "2"], "trn2", ["--logical-nc-config=2"]),
    (["-lnc 2"], "trn2", ["--logical-nc-config=2"]),
    (["--enable-saturate-infinity"], "trn1", ["--enable-saturate-infinity"]),
    # Needed on trn1 only, accepted without effect elsewhere (the reference):
    # refusing it on inf2 refused a harmless flag.
    (["--enable-saturate-infinity"], "inf2", ["--enable-saturate-infinity"]),
    (["--enable-saturate-infinity"], "trn2", ["--enable-saturate-infinity"]),
    # "-O <opt_level>" is the reference's own spelling.
    (["-O 1"], "inf2", ["--optlevel=1"]),
    (["-O", "3"], "trn1", ["--optlevel=3"]),
    # "--lnc" is how the error-code and profiling guides spell -lnc.
    (["--lnc", "1"], "trn2", ["--logical-nc-config=1"]),
    (["--lnc=2"], "trn2", ["--logical-nc-config=2"]),
    (["--distribution-strategy=llm-training"], "trn1", ["--distribution-strategy=llm-training"]),
    (["--distribution-strategy", "llm-training"], "trn2", ["--distribution-strategy=llm-training"]),
    (["--native-int64=enabled"], "trn2", ["--native-int64=enabled"]),
    (["--native-int64", "disabled"], "trn2", ["--native-int64=disabled"]),
    (["--implicit-integer-downcast=none"], "inf2", ["--implicit-integer-downcast=none"]),
    (["--implicit-integer-downcast", "dot,pow"], "trn2", ["--implicit-integer-downcast=dot,pow"]),
    (["--verbose=info"], "inf2", ["--verbose=info"]),
    (["--verbose", "debug"], "trn1", ["--verbose=debug"]),
    (["--enable-fast-loading-neuron-binaries"], "inf2", ["--enable-fast-loading-neuron-binaries"]),
    (["--enable-fast-context-switch"], "inf2", ["--enable-fast-context-switch"]),
    (["--enable-mixed-precision-accumulation"], "inf2", ["--enable-mixed-precision-accumulation"]),
    (["--disable-mixed-precision-accumulation"], "trn1", ["--disable-mixed-precision-accumulation"]),
    ([], "inf2", []),
    (["", "  "], "inf2", []),
    (["--optlevel=1"], "cpu", ["--optlevel=1"]),
    (
        ["--model-type=transformer", "--auto-cast matmult", "--auto-cast-type", "bf16", "-O1"],
        "inf2",
        ["--model-type=transformer", "--auto-cast=matmult", "--auto-cast-type=bf16", "--optlevel=1"],
    ),
]


@pytest.mark.parametrize(("options", "target", "expected"), ALLOWED)
def test_it_accepts_and_normalizes_every_allowed_form(options, target, expected):
    assert validate_compiler_options(options, target) == expected


REFUSED = [
    # (options, target, text the message must contain besides the offending option)
    (["--auto-cast=none; rm -rf /"], "inf2", "';'"),
    (["--auto-cast=none;", "id"], "inf2", "';'"),
    (["$(whoami)"], "inf2", "'$'"),
    (["--model-type=$(id)"], "inf2", "'$'"),
    (["`id`"], "inf2", "'`'"),
    (["--model-type=`id`"], "inf2", "'`'"),
    (["--auto-cast=none && curl evil"], "inf2", "'&'"),
    (["--auto-cast=none | sh"], "inf2", "'|'"),
    (["--auto-cast=none > /etc/passwd"], "inf2", "'>'"),
    (["--optlevel=1\nrm -rf /"], "inf2", "'\\n'"),
    (["-o /tmp/evil.neff"], "inf2", "output location"),
    (["-o", "/tmp/evil.neff"], "inf2", "output location"),
    (["--output=/tmp/evil.neff"], "inf2", "output location"),
    (["--output", "x.neff"], "inf2", "output location"),
    (["--logfile=/etc/cron.d/x"], "inf2", "compile log location"),
    (["--logfile", "log.txt"], "inf2", "compile log location"),
    (["--target=trn2"], "inf2", "target field"),
    (["--cache_dir=/tmp/x"], "inf2", "compile cache"),
    (["@flags.txt"], "inf2", "response files"),
    (["--auto-cast", "@flags.txt"], "inf2", "response files"),
    (["--verbose=loud"], "inf2", "not one of debug, info, warning, error, critical"),
    (["--distribution-strategy=NEMO-ish"], "trn1", "not one of llm-training"),
    (["--native-int64=enabled"], "trn1", "only applies to target trn2"),
    (["--implicit-integer-downcast=dot,add"], "trn2", "comma-separated list of dot, scatter"),
    (["--implicit-integer-downcast=dot,dot"], "trn2", "not one of"),
    (["--auto-cast=none,all"], "inf2", "not one of none, matmult, all"),
    (["-O", "4"], "inf2", "-O1, -O2 or -O3"),
    (["--lnc", "2"], "trn1", "only applies to target trn2"),
    (["--some-future-flag"], "inf2", "unknown or unsupported flag"),
    (["-X"], "inf2", "unknown or unsupported flag"),
    (["--auto-cast=fast"], "inf2", "not one of none, matmult, all"),
    (["--auto-cast-type=int4"], "inf2", "not one of"),
    (["--model-type=llama"], "inf2", "not one of"),
    (["--optlevel=4"], "inf2", "not one of 1, 2, 3"),
    (["-O4"], "inf2", "-O1, -O2 or -O3"),
    (["-O"], "inf2", "-O1, -O2 or -O3"),
    (["--auto-cast"], "inf2", "needs a value"),
    (["--auto-cast", "--optlevel=1"], "inf2", "needs a value"),
    (["matmult"], "inf2", "is not a flag"),
    (["--enable-fast-context-switch=yes"], "inf2", "takes no value"),
    (["--logical-nc-config=2"], "inf2", "only applies to target trn2"),
    (["-lnc", "1"], "trn1", "only applies to target trn2"),
    (["--enable-saturate-infinity"], "cpu", "only applies to target inf2 or trn1 or trn2"),
    (["--logical-nc-config=3"], "trn2", "not one of 1, 2"),
    (["-O1", "--optlevel=2"], "inf2", "more than once"),
    (["--auto-cast=none", "--auto-cast", "all"], "inf2", "more than once"),
    (
        ["--enable-mixed-precision-accumulation", "--disable-mixed-precision-accumulation"],
        "inf2",
        "contradict",
    ),
]


@pytest.mark.parametrize(("options", "target", "reason"), REFUSED)
def test_it_refuses_each_injection_or_unknown_option_naming_it(options, target, reason):
    with pytest.raises(CompilerOptionError) as info:
        validate_compiler_options(options, target)
    message = str(info.value)
    assert reason in message
    assert any(repr(option) in message for option in options), message


def test_the_error_is_a_value_error_for_callers_that_catch_those():
    with pytest.raises(ValueError):
        validate_compiler_options(["--nope"], "inf2")


@pytest.mark.parametrize("bad", ["--auto-cast=none", b"-O1", None, 3])
def test_it_refuses_anything_but_a_list_of_strings(bad):
    with pytest.raises(CompilerOptionError):
        validate_compiler_options(bad, "inf2")


def test_it_refuses_non_string_items_and_overlong_lists():
    with pytest.raises(CompilerOptionError, match="not a string"):
        validate_compiler_options(["-O1", 2], "inf2")
    with pytest.raises(CompilerOptionError, match="too many"):
        validate_compiler_options(["-O1"] * 33, "inf2")
    with pytest.raises(CompilerOptionError, match="longer than"):
        validate_compiler_options(["--model-type=" + "x" * 300], "inf2")


def test_it_refuses_an_unknown_target():
    with pytest.raises(CompilerOptionError, match="unknown target 'inf1'"):
        validate_compiler_options([], "inf1")


# ---------------------------------------------------------------- cache key

BASE = {
    "model_digest": "a" * 64,
    "batch_size": 1,
    "sequence_length": 128,
    "options": ["--auto-cast=matmult", "-O1"],
    "backend": "neuron",
    "compiler_version": "torch-neuronx-2.9.0+neuronx-cc-2.26",
    "target": "inf2",
}


def test_the_cache_key_is_a_stable_sha256_hex():
    key = compile_cache_key(**BASE)
    assert key == compile_cache_key(**BASE)
    assert len(key) == 64 and int(key, 16) >= 0


def test_the_cache_key_ignores_option_spelling_and_order():
    respelled = {**BASE, "options": ["--optlevel", "1", "--auto-cast matmult"]}
    assert compile_cache_key(**respelled) == compile_cache_key(**BASE)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_digest", "b" * 64),
        ("batch_size", 2),
        ("sequence_length", 256),
        ("options", ["--auto-cast=matmult", "-O2"]),
        ("options", []),
        ("backend", "cpu"),
        ("compiler_version", "torch-neuronx-2.9.0+neuronx-cc-2.27"),
        ("target", "trn1"),
    ],
)
def test_the_cache_key_changes_with_every_field(field, value):
    assert compile_cache_key(**{**BASE, field: value}) != compile_cache_key(**BASE)


def test_the_cache_key_refuses_invalid_options():
    with pytest.raises(CompilerOptionError):
        compile_cache_key(**{**BASE, "options": ["--output=/x"]})
