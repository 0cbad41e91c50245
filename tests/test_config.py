"""neuron_workers.config: every NEURONDECK_* switch, its default, its parsing and its error.

No Django, no database: the accessors are pure functions of an environment
mapping (or os.environ when none is given).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from neuron_workers import config
from neuron_workers.backends.neuron import compile_cache_dir
from neuron_workers.config import ConfigError
from neuron_workers.readers.neuron_ls import detect_instance_type

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- defaults


def test_every_switch_has_its_default_when_unset(monkeypatch):
    monkeypatch.setattr(config.os, "cpu_count", lambda: 6)
    assert config.values({}) == {
        "NEURONDECK_HOST": "",
        "NEURONDECK_CPU_SLOTS": 6,
        "NEURONDECK_INSTANCE_TYPE": "",
        "NEURONDECK_COMPILE_CACHE": "/var/tmp/neuron-compile-cache",
        "NEURONDECK_MODEL_CACHE_ENTRIES": 8,
        "NEURONDECK_MODEL_CACHE_MB": 1024,
        "NEURONDECK_ZYGOTE_PRELOAD": config.DEFAULT_ZYGOTE_PRELOAD,
        "NEURONDECK_WARM_RUNNERS": 8,
        "NEURONDECK_RUNNER_JOBS": 100,
        "NEURONDECK_LIFELINE_FD": None,
        "NEURONDECK_LIFELINE_GRACE_S": 10.0,
        "NEURONDECK_JOB_CORES": None,
        "NEURONDECK_URL": None,
        "NEURONDECK_TOKEN": None,
        "NEURONDECK_JOB_PYTHON": None,
        "NEURONDECK_NEURON_SDK": None,
        "NEURONDECK_ADDRESS": "",
        "NEURONDECK_NETWORK": "",
        "NEURONDECK_GANG_HOSTS": (),
        "NEURONDECK_TRIAL_STEPS": None,
    }


def test_a_blank_value_means_the_default(monkeypatch):
    monkeypatch.setattr(config.os, "cpu_count", lambda: 6)
    blank = {name: "  " for name in config.SWITCHES if name != config.ZYGOTE_PRELOAD_ENV}
    assert {name: value for name, value in config.values(blank).items() if name in blank} == {
        name: value for name, value in config.values({}).items() if name in blank
    }


def test_cpu_slots_default_to_one_when_the_cpu_count_is_unknown(monkeypatch):
    monkeypatch.setattr(config.os, "cpu_count", lambda: None)
    assert config.cpu_slots({}) == 1


def test_an_empty_preload_list_preloads_nothing_while_an_unset_one_preloads_the_default():
    assert config.zygote_preload({config.ZYGOTE_PRELOAD_ENV: ""}) == ()
    assert config.zygote_preload({}) == config.DEFAULT_ZYGOTE_PRELOAD


# ---------------------------------------------------------------- valid values


def test_valid_values_are_parsed_to_their_types():
    env = {
        "NEURONDECK_HOST": " trn1-a ",
        "NEURONDECK_CPU_SLOTS": "3",
        "NEURONDECK_INSTANCE_TYPE": "trn1.2xlarge\n",
        "NEURONDECK_COMPILE_CACHE": "/storage/neuron-compile-cache",
        "NEURONDECK_MODEL_CACHE_ENTRIES": "0",
        "NEURONDECK_MODEL_CACHE_MB": "256",
        "NEURONDECK_ZYGOTE_PRELOAD": "torch, tests.cache_backends ,neuron_workers.process.zygote_warmup:warm_up,",
        "NEURONDECK_WARM_RUNNERS": "0",
        "NEURONDECK_RUNNER_JOBS": "1",
        "NEURONDECK_LIFELINE_FD": "7",
        "NEURONDECK_LIFELINE_GRACE_S": "0.5",
        "NEURONDECK_JOB_CORES": "2",
        "NEURONDECK_URL": "https://neurondeck.example.com/",
        "NEURONDECK_TOKEN": " nd_abc123 ",
        "NEURONDECK_JOB_PYTHON": "/opt/aws_neuronx_venv_pytorch_2_9/bin/python",
        "NEURONDECK_NEURON_SDK": "2.29.0",
        "NEURONDECK_ADDRESS": " 10.0.3.7 ",
        "NEURONDECK_NETWORK": "pg-trn1-a",
        "NEURONDECK_GANG_HOSTS": "10.0.3.7,10.0.3.8",
        "NEURONDECK_TRIAL_STEPS": "3",
    }
    assert config.values(env) == {
        "NEURONDECK_HOST": "trn1-a",
        "NEURONDECK_CPU_SLOTS": 3,
        "NEURONDECK_INSTANCE_TYPE": "trn1.2xlarge",
        "NEURONDECK_COMPILE_CACHE": "/storage/neuron-compile-cache",
        "NEURONDECK_MODEL_CACHE_ENTRIES": 0,
        "NEURONDECK_MODEL_CACHE_MB": 256,
        "NEURONDECK_ZYGOTE_PRELOAD": ("torch", "tests.cache_backends", "neuron_workers.process.zygote_warmup:warm_up"),
        "NEURONDECK_WARM_RUNNERS": 0,
        "NEURONDECK_RUNNER_JOBS": 1,
        "NEURONDECK_LIFELINE_FD": 7,
        "NEURONDECK_LIFELINE_GRACE_S": 0.5,
        "NEURONDECK_JOB_CORES": 2,
        "NEURONDECK_URL": "https://neurondeck.example.com/",
        "NEURONDECK_TOKEN": "nd_abc123",
        "NEURONDECK_JOB_PYTHON": "/opt/aws_neuronx_venv_pytorch_2_9/bin/python",
        "NEURONDECK_NEURON_SDK": "2.29.0",
        "NEURONDECK_ADDRESS": "10.0.3.7",
        "NEURONDECK_NETWORK": "pg-trn1-a",
        "NEURONDECK_GANG_HOSTS": ("10.0.3.7", "10.0.3.8"),
        "NEURONDECK_TRIAL_STEPS": 3,
    }


def test_accessors_read_the_process_environment_when_called(monkeypatch):
    monkeypatch.setenv("NEURONDECK_RUNNER_JOBS", "7")
    assert config.runner_jobs() == 7
    monkeypatch.setenv("NEURONDECK_RUNNER_JOBS", "9")
    assert config.runner_jobs() == 9


# ---------------------------------------------------------------- bad values


def test_a_bad_value_is_a_config_error_naming_the_variable_the_rule_and_the_value():
    with pytest.raises(ConfigError) as info:
        config.cpu_slots({"NEURONDECK_CPU_SLOTS": "abc"})
    assert str(info.value) == "NEURONDECK_CPU_SLOTS must be an integer >= 1, got 'abc'"


def test_a_config_error_is_a_value_error_so_existing_handlers_still_catch_it():
    with pytest.raises(ValueError, match="NEURONDECK_CPU_SLOTS"):
        config.cpu_slots({"NEURONDECK_CPU_SLOTS": "0"})


@pytest.mark.parametrize(
    ("name", "raw", "rule"),
    [
        ("NEURONDECK_CPU_SLOTS", "0", "an integer >= 1"),
        ("NEURONDECK_CPU_SLOTS", "-2", "an integer >= 1"),
        ("NEURONDECK_CPU_SLOTS", "2.5", "an integer >= 1"),
        ("NEURONDECK_CPU_SLOTS", "1_000", "an integer >= 1"),
        ("NEURONDECK_MODEL_CACHE_ENTRIES", "-1", "an integer >= 0"),
        ("NEURONDECK_MODEL_CACHE_ENTRIES", "eight", "an integer >= 0"),
        ("NEURONDECK_MODEL_CACHE_MB", "1GB", "an integer >= 0"),
        ("NEURONDECK_WARM_RUNNERS", "-1", "an integer >= 0"),
        ("NEURONDECK_RUNNER_JOBS", "0", "an integer >= 1"),
        ("NEURONDECK_LIFELINE_FD", "-1", "an integer >= 0"),
        ("NEURONDECK_JOB_CORES", "0", "an integer >= 1"),
        ("NEURONDECK_LIFELINE_GRACE_S", "-1", "a number >= 0"),
        ("NEURONDECK_LIFELINE_GRACE_S", "nan", "a number >= 0"),
        ("NEURONDECK_LIFELINE_GRACE_S", "inf", "a number >= 0"),
        ("NEURONDECK_LIFELINE_GRACE_S", "soon", "a number >= 0"),
        ("NEURONDECK_COMPILE_CACHE", "/var/tmp/my cache", "a directory path without whitespace"),
        ("NEURONDECK_HOST", "cpu 1", "a host name without whitespace"),
        ("NEURONDECK_INSTANCE_TYPE", "trn1 2xlarge", "an instance type without whitespace, e.g. 'trn1.32xlarge'"),
        ("NEURONDECK_ZYGOTE_PRELOAD", "torch; rm -rf /", "comma-separated module names or module:function entries"),
        ("NEURONDECK_ZYGOTE_PRELOAD", "mod:", "comma-separated module names or module:function entries"),
        ("NEURONDECK_URL", "neurondeck.example.com", "an http:// or https:// URL"),
        ("NEURONDECK_URL", "ftp://neurondeck.example.com", "an http:// or https:// URL"),
        ("NEURONDECK_JOB_PYTHON", "python3", "an absolute interpreter path without whitespace"),
        ("NEURONDECK_JOB_PYTHON", "/opt/my venv/bin/python", "an interpreter path without whitespace"),
        ("NEURONDECK_NEURON_SDK", "latest", "a Neuron SDK version such as '2.29.0'"),
        ("NEURONDECK_NEURON_SDK", "2", "a Neuron SDK version such as '2.29.0'"),
    ],
)
def test_a_bad_or_out_of_range_value_is_refused_with_its_rule(name, raw, rule):
    with pytest.raises(ConfigError) as info:
        config.SWITCHES[name]({name: raw})
    assert str(info.value) == f"{name} must be {rule}, got {raw!r}"


def test_a_bad_token_is_refused_without_echoing_it():
    with pytest.raises(ConfigError) as info:
        config.api_token({"NEURONDECK_TOKEN": "nd_secret part"})
    assert str(info.value) == "NEURONDECK_TOKEN must be an API token without whitespace, got <hidden, 14 characters>"


def test_checking_every_switch_at_once_stops_at_a_bad_one():
    with pytest.raises(ConfigError, match="NEURONDECK_WARM_RUNNERS"):
        config.values({"NEURONDECK_WARM_RUNNERS": "many"})


# ---------------------------------------------------------------- one place for every switch


def _names_used_in_product_code() -> set[str]:
    files = [*(ROOT / "neuron_workers").rglob("*.py"), *(ROOT / "jobs").rglob("*.py"), *(ROOT / "webapp").rglob("*.py"),
             ROOT / "Makefile", ROOT / "docker-compose.yml", ROOT / "webapp" / "Procfile"]
    names: set[str] = set()
    for path in files:
        if path.is_file():
            names.update(re.findall(r"\bNEURONDECK_[A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8")))
    return names


def test_every_neurondeck_variable_the_project_uses_is_declared_in_config():
    assert _names_used_in_product_code() - set(config.SWITCHES) == set()


def test_backends_and_readers_name_no_neurondeck_variable_outside_config():
    """Their switches are read through config's accessors, not os.environ[...] with a literal name."""
    offenders = []
    for folder in ("backends", "readers"):
        for path in sorted((ROOT / "neuron_workers" / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and re.fullmatch(r"NEURONDECK_[A-Z0-9_]+", node.value):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value}")
    assert offenders == []


def test_the_neuron_ls_reader_takes_the_instance_type_from_config(tmp_path):
    none = tmp_path / "none"
    assert detect_instance_type({"NEURONDECK_INSTANCE_TYPE": " inf2.xlarge "}, none, none) == "inf2.xlarge"
    with pytest.raises(ConfigError, match="NEURONDECK_INSTANCE_TYPE"):
        detect_instance_type({"NEURONDECK_INSTANCE_TYPE": "inf2 xlarge"}, none, none)


def test_the_neuron_backend_takes_its_compile_cache_from_config():
    assert compile_cache_dir({"NEURONDECK_COMPILE_CACHE": "/storage/cc"}) == "/storage/cc"
    with pytest.raises(ConfigError, match="NEURONDECK_COMPILE_CACHE"):
        compile_cache_dir({"NEURONDECK_COMPILE_CACHE": "/storage/c c"})


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", **env})


def test_the_model_cache_takes_its_bounds_from_config_and_refuses_a_bad_one_at_import():
    code = ("from neuron_workers.config import ConfigError\n"
            "try:\n"
            "    from neuron_workers.backends import hf\n"
            "except ConfigError as exc:\n"
            "    print(exc)\n"
            "else:\n"
            "    print(hf.cache_info()['max_entries'], hf.cache_info()['max_bytes'])\n")
    good = _python(code, NEURONDECK_MODEL_CACHE_ENTRIES="3", NEURONDECK_MODEL_CACHE_MB="2")
    assert good.stdout.split() == ["3", str(2 << 20)], good.stderr
    bad = _python(code, NEURONDECK_MODEL_CACHE_ENTRIES="-1")
    assert bad.stdout.strip() == "NEURONDECK_MODEL_CACHE_ENTRIES must be an integer >= 0, got '-1'", bad.stderr


def test_importing_config_pulls_in_nothing_beyond_the_standard_library():
    done = _python("import sys, neuron_workers.config; "
                   "print([m for m in ('django', 'torch', 'jobs', 'redis') if m in sys.modules])")
    assert done.stdout.strip() == "[]", done.stderr


def test_a_bad_switch_stops_every_django_process_at_start_naming_the_variable():
    """settings.py checks every switch, so the web app, scheduler, worker and agent
    refuse to start rather than fail in the middle of a job."""
    done = subprocess.run([sys.executable, "manage.py", "check"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "NEURONDECK_WARM_RUNNERS": "many"})
    assert done.returncode != 0
    assert "NEURONDECK_WARM_RUNNERS must be an integer >= 0, got 'many'" in done.stderr
