"""A host's jobs run in its own job Python (NEURONDECK_JOB_PYTHON), not the web app's.

The stand-in job Python is a bare system interpreter (no site-packages: neither
Django nor torch nor anything the web app pins) that records how it was started.
The exec-mode launcher must start the runner with it, and the runner must work
there with only this project on PYTHONPATH.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path


from neuron_workers.process.groups import kill_process_group
from tests.test_neuron_env import BARE_PYTHON, needs_bare_python

# The module, not the package's re-exported launch() function.
launch = importlib.import_module("neuron_workers.process.launch")


def recording_python(root: Path) -> tuple[Path, Path]:
    record = root / "started.jsonl"
    python = root / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\n"
                      f"printf '%s\\n' \"{{\\\"argv\\\": \\\"$*\\\", \\\"path\\\": \\\"$PATH\\\"}}\" >> {record}\n"
                      f"exec {BARE_PYTHON} -S \"$@\"\n")
    python.chmod(0o755)
    return python, record


def test_without_a_job_python_jobs_start_with_this_interpreter(monkeypatch):
    monkeypatch.delenv("NEURONDECK_JOB_PYTHON", raising=False)
    env = {"PATH": "/usr/bin"}
    assert launch.job_interpreter(env) == (sys.executable, env)


def test_the_job_python_goes_first_on_path_as_its_virtualenv_would(monkeypatch):
    monkeypatch.setenv("NEURONDECK_JOB_PYTHON", "/opt/aws_neuronx_venv_pytorch_2_9/bin/python")
    python, env = launch.job_interpreter({"PATH": "/usr/bin:/opt/aws/neuron/bin:/bin", "HOME": "/root"})
    assert python == "/opt/aws_neuronx_venv_pytorch_2_9/bin/python"
    assert env == {"PATH": "/opt/aws_neuronx_venv_pytorch_2_9/bin:/opt/aws/neuron/bin:/usr/bin:/bin", "HOME": "/root"}


@needs_bare_python
def test_an_exec_mode_job_runs_in_the_job_python_without_the_web_apps_packages(tmp_path, monkeypatch):
    python, record = recording_python(tmp_path)
    monkeypatch.setenv("NEURONDECK_JOB_PYTHON", str(python))
    workdir = tmp_path / "job"
    payload = {"job_id": 7, "kind": "inference", "backend": "tests.fake_backends:OkBackend", "spec": {},
               "workdir": str(workdir), "inputs": {}, "cores": "4",
               "env": {"NEURON_RT_VISIBLE_CORES": "4", "NEURON_PROCESS_TAG": "job-7"}}
    handle = launch.launch(payload, mode="exec")
    try:
        assert handle.wait(60), (workdir / "log.txt").read_text()
    finally:
        kill_process_group(handle.pgid, 0)
        handle.close()
    verdict = json.loads((workdir / "result.json").read_text())
    assert verdict["ok"], (workdir / "log.txt").read_text()
    (started,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert started["argv"].startswith("-m neuron_workers.process.runner ")
    assert started["path"].split(":")[0] == str(python.parent)
    assert verdict["result"]["visible_cores"] == "4"
    assert verdict["result"]["environ"]["PATH"].split(":")[0] == str(python.parent)


@needs_bare_python
def test_the_runner_and_backend_registry_import_in_a_bare_python(tmp_path):
    import subprocess

    code = ("import sys, neuron_workers.process.runner, neuron_workers.backends, "
            "neuron_workers.backends.neuron_launch, neuron_workers.backends.neuron_env; "
            "print(sorted(m for m in ('django', 'jobs', 'torch', 'celery', 'redis') if m in sys.modules))")
    started = time.monotonic()
    done = subprocess.run([BARE_PYTHON, "-S", "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert time.monotonic() - started < 60
