"""The host's job Python and the Neuron version matrix (neuron_env, neuron_matrix).

No Neuron software here: the job Python is a stand-in interpreter, a bare system
Python (no site-packages: no Django, no torch) whose path holds distribution
metadata of the versions a Neuron environment would have. The probe runs in it
for real, as the agent runs it at registration.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from neuron_workers.backends import neuron_env
from neuron_workers.backends.neuron_matrix import (
    Refusal,
    compile_lnc,
    fleet_refusal,
    framework_path,
    job_refusal,
    version_tuple,
)

BARE_PYTHON = "/usr/bin/python3"

XLA_VERSIONS = {"torch": "2.9.0", "torch-neuronx": "2.9.0.2.15.32035", "torch-xla": "2.9.0",
                "neuronx-cc": "2.27.5334.0", "libneuronxla": "2.2.14584.0", "transformers": "4.57.6"}
NATIVE_VERSIONS = {"torch": "2.13.0", "torch-neuronx": "2.13.0.1.0", "neuronx-cc": "2.28.1.0"}


def stand_in_python(root: Path, versions: dict[str, str]) -> Path:
    """An interpreter script: the bare system Python, with `versions` installed as metadata only."""
    site = root / "site"
    for name, version in versions.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    python = root / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nPYTHONPATH="$PYTHONPATH:{site}" exec {BARE_PYTHON} -S "$@"\n')
    python.chmod(0o755)
    return python


needs_bare_python = pytest.mark.skipif(not os.access(BARE_PYTHON, os.X_OK), reason="no system Python")


# ---------------------------------------------------------------- the probe


@needs_bare_python
def test_the_probe_runs_in_the_job_python_without_django_or_the_web_apps_packages(tmp_path):
    python = stand_in_python(tmp_path / "venv", XLA_VERSIONS)
    report = neuron_env.probe_interpreter(str(python), env={**os.environ, "NEURONDECK_NEURON_SDK": "2.29.0"})
    assert "error" not in report, report
    assert report["packages"]["torch"] == "2.9.0" and report["packages"]["torch_xla"] == "2.9.0"
    assert report["packages"]["safetensors"] is None
    assert report["framework"] == "xla" and report["sdk_version"] == "2.29.0"
    assert report["compiler_version"] == "torch-neuronx-2.9.0.2.15.32035+neuronx-cc-2.27.5334.0"
    assert report["runner_error"] is None  # the job's entry point imports there
    assert report["executable"] == BARE_PYTHON


@needs_bare_python
def test_the_probe_of_a_native_torchneuron_python(tmp_path):
    report = neuron_env.probe_interpreter(str(stand_in_python(tmp_path / "venv", NATIVE_VERSIONS)))
    assert report["framework"] == "native" and report["packages"]["torch_xla"] is None


def test_a_missing_or_failing_interpreter_is_reported_not_raised(tmp_path):
    missing = neuron_env.probe_interpreter(str(tmp_path / "nope" / "python"))
    assert missing["executable"].endswith("nope/python") and "cannot run" in missing["error"]
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho 'Traceback: boom' >&2\nexit 3\n")
    broken.chmod(0o755)
    assert "exited 3: Traceback: boom" in neuron_env.probe_interpreter(str(broken))["error"]


def test_the_job_python_is_probed_with_the_project_and_its_bin_dir_on_the_paths(tmp_path):
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "{\\"path\\": \\"$PATH\\", \\"pythonpath\\": \\"$PYTHONPATH\\"}"\n')
    python.chmod(0o755)
    report = neuron_env.probe_interpreter(str(python), env={"PATH": "/usr/bin:/bin", "PYTHONPATH": "/extra"})
    assert report["path"].split(":")[:3] == [str(python.parent), "/opt/aws/neuron/bin", "/usr/bin"]
    assert report["pythonpath"] == f"{neuron_env.PROJECT_ROOT}:/extra"


def test_the_compiler_identity_is_the_same_for_agent_and_backend():
    assert neuron_env.compiler_identity("2.9.0.2.15.32035", "2.27.5334.0") == \
        "torch-neuronx-2.9.0.2.15.32035+neuronx-cc-2.27.5334.0"
    assert neuron_env.compiler_identity(None, None) == "torch-neuronx-unknown+neuronx-cc-unknown"


def test_the_runtime_version_is_its_installed_package_s(tmp_path, monkeypatch):
    """dpkg-query answers for an installed package; an unknown one is None."""
    fake = tmp_path / "dpkg-query"
    fake.write_text('#!/bin/sh\n[ "$3" = aws-neuronx-runtime-lib ] && printf 2.26.43.0-f1a2b3c4d && exit 0\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert neuron_env.runtime_version() == "2.26.43.0"
    assert neuron_env.runtime_version("no-such-package") is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert neuron_env.runtime_version() is None


def test_the_probe_module_imports_nothing_beyond_the_standard_library():
    code = ("import sys, neuron_workers.backends.neuron_env as e; e.probe(); "
            "print([m for m in ('torch', 'torch_neuronx', 'torch_xla', 'django', 'jobs') if m in sys.modules])")
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=neuron_env.PROJECT_ROOT)
    assert done.stdout.strip() == "[]", done.stderr


# ---------------------------------------------------------------- NEURON_RT_VISIBLE_CORES


@pytest.mark.parametrize(("text", "cores"), [(None, []), ("", []), ("3", [3]), ("0-2", [0, 1, 2]),
                                            ("3-5,6", [3, 4, 5, 6]), ("4,5", [4, 5])])
def test_visible_cores_parse_every_documented_form(text, cores):
    assert neuron_env.parse_visible_cores(text) == cores


@pytest.mark.parametrize("text", ["3,5,6", "5-3", "a", "1-", "2,1"])
def test_visible_cores_refuse_what_the_runtime_refuses(text):
    with pytest.raises(ValueError):
        neuron_env.parse_visible_cores(text)


# ---------------------------------------------------------------- the matrix


def report(versions: dict[str, str], sdk: str | None = None) -> dict:
    packages = {key: versions.get(dist) for key, dist in neuron_env.PACKAGES.items()}
    return {"executable": "/opt/venv/bin/python", "packages": packages, "sdk_version": sdk,
            "framework": framework_path(packages["torch"])}


XLA_229, XLA_231, XLA_UNKNOWN = report(XLA_VERSIONS, "2.29.0"), report(XLA_VERSIONS, "2.31.0"), report(XLA_VERSIONS)
NATIVE_233, NATIVE_232 = report(NATIVE_VERSIONS, "2.33.0"), report(NATIVE_VERSIONS, "2.32.0")


def test_versions_and_paths():
    assert version_tuple("2.9.0+cpu") == (2, 9, 0) and version_tuple("2.13.0.1.0") == (2, 13, 0, 1, 0)
    assert version_tuple("") is None and version_tuple(None) is None
    assert [framework_path(v) for v in ("2.9.0", "2.9.1+cpu", "2.10.0", "2.13.0", None)] == \
        ["xla", "xla", "native", "native", None]


@pytest.mark.parametrize(
    ("kind", "family", "software", "extra", "fragment"),
    [
        # native TorchNeuron is Trn2/Trn3 only
        ("finetune", "inf2", NATIVE_233, {}, "Trn2/Trn3 only"),
        ("inference", "trn1", NATIVE_233, {"model_format": "neuron"}, "Trn2/Trn3 only"),
        # and public from 2.33
        ("finetune", "trn2", NATIVE_232, {}, "public from Neuron 2.33"),
        # trace artifacts need the XLA torch-neuronx
        ("compile", "trn2", NATIVE_233, {}, "torch_neuronx.trace"),
        ("inference", "trn2", NATIVE_233, {"model_format": "neuron"}, "torch_neuronx.trace"),
        # no XLA training from 2.30
        ("finetune", "trn1", XLA_231, {}, "unsupported from Neuron 2.30"),
        ("finetune", "trn2", XLA_231, {}, "unsupported from Neuron 2.30"),
        # missing pieces
        ("finetune", "trn1", report({"torch": "2.9.0"}, "2.29.0"), {}, "no torch-xla"),
        ("compile", "inf2", report({"torch": "2.9.0"}), {}, "no torch-neuronx"),
        ("compile", "inf2", report({}), {}, "has no torch"),
        ("compile", "inf2", {"executable": "/x/python", "error": "cannot run /x/python"}, {}, "could not be probed"),
    ],
)
def test_a_job_the_hosts_python_cannot_run_is_refused_with_the_reason(kind, family, software, extra, fragment):
    refusal = job_refusal(kind, family, 1, software, **extra)
    assert refusal is not None and refusal.code == "neuron_env" and fragment in refusal.message


@pytest.mark.parametrize(
    ("kind", "family", "software", "extra"),
    [
        ("compile", "inf2", XLA_231, {}),  # XLA inference is maintained on Inf2/Trn1
        ("inference", "trn1", XLA_231, {"model_format": "neuron"}),
        ("finetune", "trn1", XLA_229, {}),
        ("finetune", "trn1", XLA_UNKNOWN, {}),  # the release unknown: nothing against it
        ("finetune", "trn2", NATIVE_233, {}),
        ("inference", "trn2", NATIVE_233, {"model_format": "hf"}),  # an HF model runs on the host CPU
        ("compile", "inf2", {}, {}),  # a host that reported nothing
        ("compile", "cpu", NATIVE_233, {}),
        ("finetune", "", NATIVE_233, {}),  # a job process that knows no family
    ],
)
def test_a_job_the_hosts_python_can_run_passes(kind, family, software, extra):
    assert job_refusal(kind, family, 1, software, **extra) is None


def test_trn1_collectives_take_1_2_8_or_32_cores():
    assert [job_refusal("finetune", "trn1", n, XLA_229) is None for n in (1, 2, 4, 8, 16, 32)] == \
        [True, True, False, True, False, True]
    assert job_refusal("finetune", "trn1", 4, XLA_229).field == "cores"
    assert job_refusal("inference", "trn1", 4, XLA_229, model_format="neuron") is None  # DataParallel, no collective


def test_trn2_compiler_and_runtime_logical_cores_must_agree():
    assert compile_lnc(["--auto-cast=all", "--logical-nc-config=1"]) == 1 and compile_lnc([]) is None
    refusal = job_refusal("compile", "trn2", 1, XLA_229, compiler_options=["--logical-nc-config=1"], host_lnc=2)
    assert refusal == Refusal("lnc_mismatch", refusal.message, "compiler_options")
    assert "NEURON_LOGICAL_NC_CONFIG=2" in refusal.message
    assert job_refusal("compile", "trn2", 1, XLA_229, compiler_options=["--logical-nc-config=1"], host_lnc=1) is None
    assert job_refusal("compile", "trn2", 1, XLA_229, compiler_options=["--logical-nc-config=2"]) is None  # default 2
    assert job_refusal("inference", "trn2", 1, XLA_229, model_format="neuron", model_lnc=1, host_lnc=2).field == "model"


def test_a_family_is_refused_only_when_none_of_its_hosts_can_run_the_job():
    assert fleet_refusal("finetune", "trn2", 1, [(XLA_231, 2), (NATIVE_233, 2)]) is None
    refusal = fleet_refusal("finetune", "trn2", 1, [(XLA_231, 2), (NATIVE_232, 2)])
    assert refusal is not None and "2.30" in refusal.message
    assert fleet_refusal("finetune", "trn2", 1, []) is None


def test_the_matrix_module_is_pure():
    source = Path(neuron_env.__file__).with_name("neuron_matrix.py").read_text()
    assert "import os" not in source and "subprocess" not in source and "json.dump" not in source
    assert json.loads(json.dumps(NATIVE_233)) == NATIVE_233
