"""Submit refuses a Neuron job no host of its family can run, and the worker tells the
job what its host is (real PostgreSQL; the hosts' reports are what the agent stores)."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.utils import timezone

from jobs.lifecycle.forms import CompileForm, FinetuneForm, InferenceForm
from jobs.lifecycle.services import SubmitRefused, job_submit
from jobs.models import Host, Job, ModelAsset
from neuron_workers.backends import neuron_env
from neuron_workers.execution import build_payload

XLA = {"torch": "2.9.0", "torch-neuronx": "2.9.0.2.15.32035", "torch-xla": "2.9.0", "neuronx-cc": "2.27.5334.0"}
NATIVE = {"torch": "2.13.0", "torch-neuronx": "2.13.0.1.0", "neuronx-cc": "2.28.1.0"}


def software(versions: dict, sdk: str | None) -> dict:
    packages = {key: versions.get(dist) for key, dist in neuron_env.PACKAGES.items()}
    return {"executable": "/opt/aws_neuronx_venv_pytorch/bin/python", "packages": packages, "sdk_version": sdk,
            "framework": "xla" if versions["torch"].startswith("2.9") else "native",
            "compiler_version": neuron_env.compiler_identity(versions.get("torch-neuronx"), versions.get("neuronx-cc"))}


def neuron_host(name: str, family: str, cores: int, report: dict | None, lnc: int | None = None) -> Host:
    inventory = {"family": family, "core_ids": list(range(cores)), "lnc": lnc}
    if report is not None:
        inventory.update(software=report, compiler_version=report["compiler_version"])
    return Host.objects.create(name=name, family=family, core_ids=list(range(cores)), backend="neuron",
                               device_count=cores // 2, inventory=inventory, last_heartbeat=timezone.now())


def submit(form_class, team, user, **data):
    form = form_class(data=data, team=team)
    assert form.is_valid(), form.errors
    return job_submit(team=team, user=user, form=form)


def finetune(cast, tiny_model, dataset, family, cores=1):
    return submit(FinetuneForm, cast.vision, cast.bob, model=tiny_model.pk, dataset=dataset.pk, steps=2,
                  learning_rate=1e-3, batch_size=2, sequence_length=32, family=family, cores=cores)


def compile_job(cast, tiny_model, family, options=""):
    return submit(CompileForm, cast.vision, cast.bob, model=tiny_model.pk, batch_size=1, sequence_length=32,
                  compiler_options=options, family=family, cores=1)


def test_xla_training_on_a_neuron_2_31_host_is_refused_with_the_reason(cast, tiny_model, dataset):
    neuron_host("trn1-a", "trn1", 32, software(XLA, "2.31.0"))
    with pytest.raises(SubmitRefused) as info:
        finetune(cast, tiny_model, dataset, "trn1", cores=2)
    assert info.value.code == "neuron_env" and "unsupported from Neuron 2.30" in info.value.message
    assert not Job.objects.exists()


def test_native_torchneuron_on_inf2_is_refused_and_compile_needs_the_xla_environment(cast, tiny_model):
    neuron_host("inf2-a", "inf2", 2, software(NATIVE, "2.33.0"))
    with pytest.raises(SubmitRefused, match="Trn2/Trn3 only"):
        compile_job(cast, tiny_model, "inf2")
    neuron_host("trn2-a", "trn2", 64, software(NATIVE, "2.33.0"), lnc=2)
    with pytest.raises(SubmitRefused, match="torch_neuronx.trace"):
        compile_job(cast, tiny_model, "trn2")


def test_a_family_with_one_host_that_can_run_the_job_accepts_it(cast, tiny_model, dataset):
    neuron_host("trn2-xla", "trn2", 64, software(XLA, "2.31.0"), lnc=2)
    neuron_host("trn2-native", "trn2", 64, software(NATIVE, "2.33.0"), lnc=2)
    assert finetune(cast, tiny_model, dataset, "trn2", cores=4).status == Job.Status.PENDING


def test_hosts_that_reported_nothing_are_not_held_against_a_job(cast, tiny_model):
    neuron_host("inf2-old", "inf2", 2, None)
    assert compile_job(cast, tiny_model, "inf2").status == Job.Status.PENDING


def test_a_trn1_fine_tune_takes_1_2_8_or_32_cores(cast, tiny_model, dataset):
    neuron_host("trn1-a", "trn1", 32, software(XLA, "2.29.0"))
    with pytest.raises(SubmitRefused) as info:
        finetune(cast, tiny_model, dataset, "trn1", cores=4)
    assert (info.value.code, info.value.field) == ("collective_size", "cores")
    assert finetune(cast, tiny_model, dataset, "trn1", cores=8).status == Job.Status.PENDING


def test_a_trn2_compile_must_ask_for_the_hosts_logical_core_size(cast, tiny_model):
    neuron_host("trn2-a", "trn2", 64, software(XLA, "2.31.0"), lnc=2)
    with pytest.raises(SubmitRefused) as info:
        compile_job(cast, tiny_model, "trn2", "--lnc 1")
    assert (info.value.code, info.value.field) == ("lnc_mismatch", "compiler_options")
    assert compile_job(cast, tiny_model, "trn2", "-lnc 2").status == Job.Status.PENDING


def test_an_artifact_compiled_at_another_lnc_is_refused_for_inference(cast, tiny_model):
    neuron_host("trn2-a", "trn2", 64, software(XLA, "2.31.0"), lnc=2)
    artifact = ModelAsset.objects.create(team=cast.vision, name="tiny-trn2", format=ModelAsset.Format.NEURON,
                                         path=tiny_model.path, meta={"logical_nc_config": 1, "target": "trn2"})
    with pytest.raises(SubmitRefused) as info:
        submit(InferenceForm, cast.vision, cast.bob, model=artifact.pk, prompts="hi", max_new_tokens=2,
               temperature=0, family="trn2", cores=1)
    assert (info.value.code, info.value.field) == ("lnc_mismatch", "model")


def test_the_worker_tells_the_job_its_family_target_and_runtime_lnc(cast, tiny_model, tmp_path: Path):
    host = neuron_host("trn2-a", "trn2", 64, software(XLA, "2.31.0"), lnc=1)
    job = compile_job(cast, tiny_model, "trn2")
    Job.objects.filter(pk=job.pk).update(host=host, core_start=4, cores=1)
    job = Job.objects.select_related("host", "model").get(pk=job.pk)
    payload = build_payload(job, tmp_path)
    assert (payload["spec"]["family"], payload["spec"]["target"]) == ("trn2", "trn2")
    assert payload["env"]["NEURON_LOGICAL_NC_CONFIG"] == "1"
    assert payload["env"]["NEURON_RT_VISIBLE_CORES"] == "4"
    assert "target" not in Job.objects.get(pk=job.pk).spec  # the stored spec stays the user's
