"""Every NEURONDECK_* environment switch: its name, type, range, default and one accessor.

The one place that reads NEURONDECK_* variables, so a newcomer finds every switch
here (`SWITCHES`) and a bad value fails the same way wherever it is read:

    ConfigError: NEURONDECK_CPU_SLOTS must be an integer >= 1, got 'abc'

Standard library only, no Django: host-side code (readers, backends, the runner,
the job supervisor) and the command-line client import it, and so may
`webapp/settings.py`. Accessors read
the environment when called, not at import, so a process sees a variable set
after start-up (and a test's `monkeypatch.setenv`). Each takes an optional
mapping to read instead of `os.environ`. A variable that is unset, empty or only
whitespace takes its default; NEURONDECK_ZYGOTE_PRELOAD is the exception, where
an empty value means "preload nothing".
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

Env = Mapping[str, str] | None

HOST_ENV = "NEURONDECK_HOST"
CPU_SLOTS_ENV = "NEURONDECK_CPU_SLOTS"
INSTANCE_TYPE_ENV = "NEURONDECK_INSTANCE_TYPE"
COMPILE_CACHE_ENV = "NEURONDECK_COMPILE_CACHE"
MODEL_CACHE_ENTRIES_ENV = "NEURONDECK_MODEL_CACHE_ENTRIES"
MODEL_CACHE_MB_ENV = "NEURONDECK_MODEL_CACHE_MB"
ZYGOTE_PRELOAD_ENV = "NEURONDECK_ZYGOTE_PRELOAD"
WARM_RUNNERS_ENV = "NEURONDECK_WARM_RUNNERS"
RUNNER_JOBS_ENV = "NEURONDECK_RUNNER_JOBS"
LIFELINE_FD_ENV = "NEURONDECK_LIFELINE_FD"
LIFELINE_GRACE_ENV = "NEURONDECK_LIFELINE_GRACE_S"
JOB_CORES_ENV = "NEURONDECK_JOB_CORES"
API_URL_ENV = "NEURONDECK_URL"
API_TOKEN_ENV = "NEURONDECK_TOKEN"
JOB_PYTHON_ENV = "NEURONDECK_JOB_PYTHON"
NEURON_SDK_ENV = "NEURONDECK_NEURON_SDK"
ADDRESS_ENV = "NEURONDECK_ADDRESS"
NETWORK_ENV = "NEURONDECK_NETWORK"
GANG_HOSTS_ENV = "NEURONDECK_GANG_HOSTS"
TRIAL_STEPS_ENV = "NEURONDECK_TRIAL_STEPS"

# The Neuron SDK's own default compile cache (neuron.md §4.4).
DEFAULT_COMPILE_CACHE = "/var/tmp/neuron-compile-cache"
# What a cpu host's zygote imports before it forks job processes: modules, or
# "module:function" warm-ups whose effects every forked job inherits.
DEFAULT_ZYGOTE_PRELOAD: tuple[str, ...] = ("torch", "transformers", "neuron_workers.backends.cpu",
                                           "neuron_workers.process.zygote_warmup:warm_up")


class ConfigError(ValueError):
    """A NEURONDECK_* variable holds a value its switch refuses; the message names the variable.

    A ValueError, so callers that already treat a bad setting as one keep working.
    """


def _refuse(name: str, rule: str, raw: str, *, secret: bool = False) -> ConfigError:
    # A secret's value stays out of the message: errors end up in logs and CI output.
    shown = f"<hidden, {len(raw)} characters>" if secret else repr(raw)
    return ConfigError(f"{name} must be {rule}, got {shown}")


# ---------------------------------------------------------------- parsing


def _raw(name: str, env: Env) -> str | None:
    """The variable's value, or None when it is unset or blank."""
    value = (os.environ if env is None else env).get(name)
    if value is None or not value.strip():
        return None
    return value


def _int(name: str, env: Env, *, minimum: int) -> int | None:
    raw = _raw(name, env)
    if raw is None:
        return None
    # Plain decimal digits only: int() would also take "1_000" and "+3".
    text = raw.strip()
    if not re.fullmatch(r"-?[0-9]+", text) or int(text) < minimum:
        raise _refuse(name, f"an integer >= {minimum}", raw)
    return int(text)


def _float(name: str, env: Env, *, minimum: float) -> float | None:
    raw = _raw(name, env)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= minimum or value == float("inf"):  # also refuses nan
        raise _refuse(name, f"a number >= {minimum:g}", raw)
    return value


def _word(name: str, env: Env, *, rule: str, secret: bool = False) -> str | None:
    """A value that must not contain whitespace (a path or a name passed on as one token)."""
    raw = _raw(name, env)
    if raw is None:
        return None
    text = raw.strip()
    if any(c.isspace() for c in text):
        raise _refuse(name, rule, raw, secret=secret)
    return text


# ---------------------------------------------------------------- accessors


def host_name(env: Env = None) -> str:
    """NEURONDECK_HOST: this host's name for its worker queue and agent ("" when unset:
    callers fall back to socket.gethostname()). No whitespace: it becomes the Celery
    queue name "host.<name>"."""
    return _word(HOST_ENV, env, rule="a host name without whitespace") or ""


def address(env: Env = None) -> str:
    """NEURONDECK_ADDRESS: where the other hosts of a multi-host job reach this one (a DNS
    name or IP address on the network their collectives use); "" when unset: the host's
    name (NEURONDECK_HOST) is used. Rank 0's address is the job's rendezvous point."""
    return _word(ADDRESS_ENV, env, rule="a host name or IP address without whitespace") or ""


def network(env: Env = None) -> str:
    """NEURONDECK_NETWORK: the placement group / EFA domain this host is in ("" when unset:
    none). A multi-host job that asks to stay inside one network is placed on hosts that
    report the same label."""
    raw = _word(NETWORK_ENV, env, rule="a label of at most 64 characters without whitespace") or ""
    if len(raw) > 64:
        raise _refuse(NETWORK_ENV, "a label of at most 64 characters without whitespace", raw)
    return raw


def gang_hosts(env: Env = None) -> tuple[str, ...]:
    """NEURONDECK_GANG_HOSTS: set by NeuronDeck in a multi-host job's processes: every
    host's address, comma-separated, in rank order (torchrun's GROUP_RANK indexes it);
    () outside a gang."""
    raw = _word(GANG_HOSTS_ENV, env, rule="comma-separated host addresses without whitespace") or ""
    return tuple(part for part in raw.split(",") if part)


def trial_steps(env: Env = None) -> int | None:
    """NEURONDECK_TRIAL_STEPS: set by NeuronDeck for a fine-tune's precompile stage
    (neuron_parallel_compile): train this many steps and save nothing; None otherwise."""
    return _int(TRIAL_STEPS_ENV, env, minimum=1)


def cpu_slots(env: Env = None) -> int:
    """NEURONDECK_CPU_SLOTS: job slots a CPU host offers, an integer >= 1 (default: the CPU count)."""
    slots = _int(CPU_SLOTS_ENV, env, minimum=1)
    return slots if slots is not None else os.cpu_count() or 1


def instance_type(env: Env = None) -> str:
    """NEURONDECK_INSTANCE_TYPE: the EC2 instance type, stated by the operator ("" when unset:
    the neuron-ls reader then asks DMI and the Neuron driver)."""
    return _word(INSTANCE_TYPE_ENV, env, rule="an instance type without whitespace, e.g. 'trn1.32xlarge'") or ""


def compile_cache_dir(env: Env = None) -> str:
    """NEURONDECK_COMPILE_CACHE: the neuronx-cc compile cache directory (default
    /var/tmp/neuron-compile-cache). No whitespace: it travels inside NEURON_CC_FLAGS,
    a whitespace-separated flag string."""
    return _word(COMPILE_CACHE_ENV, env, rule="a directory path without whitespace") or DEFAULT_COMPILE_CACHE


def model_cache_entries(env: Env = None) -> int:
    """NEURONDECK_MODEL_CACHE_ENTRIES: objects the in-process model cache keeps, an integer
    >= 0 (default 8; a model and its tokenizer are two; 0 turns the cache off)."""
    entries = _int(MODEL_CACHE_ENTRIES_ENV, env, minimum=0)
    return 8 if entries is None else entries


def model_cache_mb(env: Env = None) -> int:
    """NEURONDECK_MODEL_CACHE_MB: tensor megabytes the in-process model cache keeps, an
    integer >= 0 (default 1024; 0 turns the cache off)."""
    megabytes = _int(MODEL_CACHE_MB_ENV, env, minimum=0)
    return 1024 if megabytes is None else megabytes


_PRELOAD_ENTRY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)?")


def zygote_preload(env: Env = None) -> tuple[str, ...]:
    """NEURONDECK_ZYGOTE_PRELOAD: comma-separated modules (or "module:function" warm-ups)
    the zygote imports before forking jobs; unset means DEFAULT_ZYGOTE_PRELOAD, empty
    means nothing."""
    raw = (os.environ if env is None else env).get(ZYGOTE_PRELOAD_ENV)
    if raw is None:
        return DEFAULT_ZYGOTE_PRELOAD
    entries = tuple(entry.strip() for entry in raw.split(",") if entry.strip())
    if not all(_PRELOAD_ENTRY.fullmatch(entry) for entry in entries):
        raise _refuse(ZYGOTE_PRELOAD_ENV, "comma-separated module names or module:function entries", raw)
    return entries


def warm_runners(env: Env = None) -> int:
    """NEURONDECK_WARM_RUNNERS: idle warm runners a zygote keeps, an integer >= 0 (default 8; 0: none)."""
    count = _int(WARM_RUNNERS_ENV, env, minimum=0)
    return 8 if count is None else count


def runner_jobs(env: Env = None) -> int:
    """NEURONDECK_RUNNER_JOBS: jobs one runner process runs at most, an integer >= 1
    (default 100; 1: every job in a fresh process)."""
    count = _int(RUNNER_JOBS_ENV, env, minimum=1)
    return 100 if count is None else count


def lifeline_fd(env: Env = None) -> int | None:
    """NEURONDECK_LIFELINE_FD: the pipe descriptor an exec-mode job watches for its
    supervisor's exit, an integer >= 0 (None when unset: no lifeline). Set by the
    supervisor for its child, not by operators."""
    return _int(LIFELINE_FD_ENV, env, minimum=0)


def lifeline_grace_s(env: Env = None) -> float:
    """NEURONDECK_LIFELINE_GRACE_S: seconds between SIGTERM and SIGKILL once the lifeline
    breaks, a number >= 0 (default 10). Set by the supervisor for its child."""
    grace = _float(LIFELINE_GRACE_ENV, env, minimum=0.0)
    return 10.0 if grace is None else grace


def job_cores(env: Env = None) -> int | None:
    """NEURONDECK_JOB_CORES: cores allotted to the running job, an integer >= 1 (None
    outside a job). Set in the job's environment by the worker, not by operators."""
    return _int(JOB_CORES_ENV, env, minimum=1)


def api_url(env: Env = None) -> str | None:
    """NEURONDECK_URL: the server the `neurondeck` command-line client talks to, an
    http(s) URL (None when unset: the client uses the one stored by `neurondeck login`)."""
    url = _word(API_URL_ENV, env, rule="an http:// or https:// URL")
    if url is not None and not re.fullmatch(r"https?://[^/?#]+.*", url):
        raise _refuse(API_URL_ENV, "an http:// or https:// URL", url)
    return url


def api_token(env: Env = None) -> str | None:
    """NEURONDECK_TOKEN: the API token the command-line client sends, without whitespace
    (None when unset: the client uses the stored one). Never echoed in an error."""
    return _word(API_TOKEN_ENV, env, rule="an API token without whitespace", secret=True)


def job_python(env: Env = None) -> str | None:
    """NEURONDECK_JOB_PYTHON: the interpreter a host starts its exec-mode jobs with, a path
    without whitespace (None when unset: the worker's own interpreter). On a Neuron host,
    the Python of the Neuron DLAMI virtualenv or of the Neuron container, e.g.
    /opt/aws_neuronx_venv_pytorch_2_9/bin/python: torch-neuronx comes from AWS's own
    package index and pins its own torch (neuron.md §0, §4.1), which the web app's
    virtualenv cannot hold. The runner and the backends import no Django, so they run
    there with only this project on PYTHONPATH."""
    path = _word(JOB_PYTHON_ENV, env, rule="an interpreter path without whitespace")
    if path is not None and not os.path.isabs(path):
        raise _refuse(JOB_PYTHON_ENV, "an absolute interpreter path without whitespace", path)
    return path


_SDK_VERSION = re.compile(r"[0-9]+\.[0-9]+(\.[0-9]+)*")


def neuron_sdk(env: Env = None) -> str | None:
    """NEURONDECK_NEURON_SDK: the Neuron SDK release the host runs, e.g. "2.29.0", as the
    operator states it (the DLAMI's name and the Neuron container's image tag carry it;
    no file on the host does). None when unset: NeuronDeck then decides from the torch
    and torch-neuronx versions the job Python reports, and cannot apply the rules that
    depend on the release alone (no XLA training from 2.30, native from 2.33)."""
    raw = _word(NEURON_SDK_ENV, env, rule="a Neuron SDK version such as '2.29.0'")
    if raw is not None and not _SDK_VERSION.fullmatch(raw):
        raise _refuse(NEURON_SDK_ENV, "a Neuron SDK version such as '2.29.0'", raw)
    return raw


# Every switch and its accessor, for documentation, start-up checks and the test
# that no NEURONDECK_* variable is read anywhere without being declared here.
SWITCHES: dict[str, Callable[[Env], object]] = {
    HOST_ENV: host_name,
    CPU_SLOTS_ENV: cpu_slots,
    INSTANCE_TYPE_ENV: instance_type,
    COMPILE_CACHE_ENV: compile_cache_dir,
    MODEL_CACHE_ENTRIES_ENV: model_cache_entries,
    MODEL_CACHE_MB_ENV: model_cache_mb,
    ZYGOTE_PRELOAD_ENV: zygote_preload,
    WARM_RUNNERS_ENV: warm_runners,
    RUNNER_JOBS_ENV: runner_jobs,
    LIFELINE_FD_ENV: lifeline_fd,
    LIFELINE_GRACE_ENV: lifeline_grace_s,
    JOB_CORES_ENV: job_cores,
    API_URL_ENV: api_url,
    API_TOKEN_ENV: api_token,
    JOB_PYTHON_ENV: job_python,
    NEURON_SDK_ENV: neuron_sdk,
    ADDRESS_ENV: address,
    NETWORK_ENV: network,
    GANG_HOSTS_ENV: gang_hosts,
    TRIAL_STEPS_ENV: trial_steps,
}


def values(env: Env = None) -> dict[str, object]:
    """Every switch's parsed value by variable name; ConfigError on the first bad one.

    For a process to check its whole configuration at start-up instead of failing
    later in the middle of a job.
    """
    return {name: accessor(env) for name, accessor in SWITCHES.items()}
