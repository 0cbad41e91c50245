"""The model cache: in-process bounds and invalidation (backends.hf), and the
zygote's copy that forked job processes inherit (neuron_workers.process.zygote_server).

Zygote tests run real jobs through supervise() in fork mode, with the real
preload (torch, transformers, the cpu backend) and tests.cache_backends, which
reports what each child found in its inherited cache.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuron_workers.backends import hf
from neuron_workers.backends.tinymodel import create_tiny_model
from neuron_workers.process import DEFAULT_PRELOAD, Zygote, supervise
from tests.cache_backends import weights_checksum

PROBE = "tests.cache_backends:ProbeBackend"
# The zygote only preloads for backends it has imported itself.
PRELOAD = (*DEFAULT_PRELOAD, "tests.cache_backends")
_ids = iter(range(700_000, 800_000))


@pytest.fixture(autouse=True)
def _fresh_in_process_cache():
    hf.clear_cache()
    info = hf.cache_info()
    yield
    hf.configure_cache(entries=info["max_entries"], max_bytes=info["max_bytes"])
    hf.clear_cache()


def fresh_checksum(path: Path) -> float:
    return weights_checksum(hf.load_causal_lm(path))


def run_job(zygote: Zygote | None, workdir: Path, model: Path, kind: str = "inference", backend: str = PROBE,
            spec: dict | None = None, mode: str = "fork", inputs: dict | None = None):
    job_id = next(_ids)
    payload = {"job_id": job_id, "kind": kind, "backend": backend, "spec": spec or {}, "workdir": str(workdir),
               "inputs": inputs or {"model_path": str(model), "model_format": "hf"}, "cores": "0",
               "env": {"NEURON_PROCESS_TAG": f"job-{job_id}"}}
    outcome = supervise(payload, mode=mode, heartbeat=lambda: None, should_cancel=lambda: False,
                        on_log=lambda offset, text: None, on_metric=lambda row: None, max_runtime_s=120,
                        zygote=zygote)
    assert outcome.status == "succeeded", (outcome, (workdir / "log.txt").read_text())
    return outcome.result


@pytest.fixture(scope="module")
def zygote():
    z = Zygote(PRELOAD)
    z.start()
    yield z
    z.close()


@pytest.fixture
def model(tmp_path) -> Path:
    return create_tiny_model(tmp_path / "model", seed=3)


# ------------------------------------------------------------------ in process


def test_a_cached_model_is_loaded_once_and_reloaded_when_its_file_changes(tmp_path):
    path = create_tiny_model(tmp_path / "m", seed=0)
    first, _ = hf.cached_hf_model(path)
    assert hf.cached_hf_model(path)[0] is first and hf.is_cached("hf-model", path)
    before = weights_checksum(first)
    create_tiny_model(path, seed=1)  # rewritten in place: new bytes, new mtime
    assert not hf.is_cached("hf-model", path)
    second, _ = hf.cached_hf_model(path)
    assert second is not first and weights_checksum(second) == fresh_checksum(path) != before
    # The old entry is dropped rather than aging out, and the first object was
    # not changed by the rewrite of the file it was loaded from (own storage).
    assert hf.cache_info()["entries"] == 2  # model + tokenizer
    assert weights_checksum(first) == before


def test_the_cache_is_bounded_by_entries_and_by_bytes(tmp_path):
    paths = [create_tiny_model(tmp_path / f"m{i}", seed=i) for i in range(3)]
    hf.configure_cache(entries=3)
    for path in paths:
        hf.cached_hf_model(path)
    info = hf.cache_info()
    assert info["entries"] == 3
    assert hf.is_cached("tokenizer", paths[2]) and hf.is_cached("hf-model", paths[2])
    assert not hf.is_cached("hf-model", paths[0])  # least recently used went first

    hf.clear_cache()
    one_model = hf.weights_bytes(paths[0])
    hf.configure_cache(entries=8, max_bytes=int(one_model * 1.5))
    for path in paths:
        hf.cached_hf_model(path)
    assert hf.cache_info()["bytes"] <= int(one_model * 1.5)
    assert [hf.is_cached("hf-model", p) for p in paths] == [False, False, True]

    hf.configure_cache(max_bytes=one_model // 2)  # smaller than any model: none is kept
    hf.cached_hf_model(paths[0])
    assert not hf.is_cached("hf-model", paths[0]) and hf.is_cached("tokenizer", paths[0])
    assert not hf.preload_hf(paths[1])  # the zygote would not even load it


def test_outside_a_one_job_process_a_model_to_train_is_always_loaded_fresh(tmp_path):
    path = create_tiny_model(tmp_path / "m")
    shared, _ = hf.cached_hf_model(path)
    owned, _ = hf.owned_hf_model(path)
    assert owned is not shared and hf.is_cached("hf-model", path)


# ------------------------------------------------------------------ zygote


def test_a_forked_job_finds_its_model_preloaded_by_the_zygote(zygote, model, tmp_path):
    first = run_job(zygote, tmp_path / "a", model)
    second = run_job(zygote, tmp_path / "b", model)
    assert first["was_cached"] and second["was_cached"]
    assert first["checksum"] == second["checksum"] == fresh_checksum(model)
    assert first["pid"] != second["pid"]  # still one process per job


def test_a_fine_tune_does_not_leak_into_the_next_job(zygote, model, tmp_path):
    pristine = fresh_checksum(model)
    assert run_job(zygote, tmp_path / "warm", model)["checksum"] == pristine
    tuned = run_job(zygote, tmp_path / "ft", model, kind="finetune")
    # It trained the inherited copy (no load), which then left its own cache...
    assert tuned["was_cached"] and not tuned["still_cached"]
    assert tuned["checksum"] != pristine
    # ... and the next jobs, fine-tune or not, start from the file's weights.
    again = run_job(zygote, tmp_path / "after", model)
    assert again["was_cached"] and again["checksum"] == pristine
    assert run_job(zygote, tmp_path / "ft2", model, kind="finetune")["checksum"] == tuned["checksum"]


def test_a_changed_model_file_is_reloaded_by_the_zygote(zygote, model, tmp_path):
    before = run_job(zygote, tmp_path / "a", model)
    create_tiny_model(model, seed=11)
    after = run_job(zygote, tmp_path / "b", model)
    assert after["was_cached"]  # the zygote noticed the new signature and loaded it before forking
    assert after["checksum"] == fresh_checksum(model) != before["checksum"]


def test_the_zygote_cache_is_bounded(monkeypatch, tmp_path):
    monkeypatch.setenv(hf.CACHE_ENTRIES_ENV, "2")  # one model + its tokenizer
    z = Zygote(PRELOAD)
    z.start()
    try:
        models = [create_tiny_model(tmp_path / f"m{i}", seed=20 + i) for i in range(3)]
        for i, path in enumerate(models):
            result = run_job(z, tmp_path / f"job{i}", path)
            assert result["was_cached"] and result["checksum"] == fresh_checksum(path)
            assert result["cache"]["entries"] <= 2 and result["cache"]["max_entries"] == 2
        # The first model was evicted, and comes back when needed again.
        back = run_job(z, tmp_path / "back", models[0])
        assert back["was_cached"] and back["checksum"] == fresh_checksum(models[0])
    finally:
        z.close()


def test_without_the_model_cache_the_child_loads_for_itself(model, tmp_path):
    z = Zygote(PRELOAD, model_cache=False)
    z.start()
    try:
        result = run_job(z, tmp_path / "a", model)
    finally:
        z.close()
    assert not result["was_cached"] and result["checksum"] == fresh_checksum(model)
    # Nor does a zygote preload for a backend it has not imported itself.
    z = Zygote(DEFAULT_PRELOAD)
    z.start()
    try:
        result = run_job(z, tmp_path / "b", model)
    finally:
        z.close()
    assert not result["was_cached"] and result["checksum"] == fresh_checksum(model)
    exec_result = run_job(None, tmp_path / "b", model, mode="exec")
    assert not exec_result["was_cached"] and exec_result["checksum"] == fresh_checksum(model)


def test_a_real_fine_tune_then_inference_in_forked_jobs_match_fresh_loads(zygote, model, demo_dataset_file, tmp_path):
    """The cpu backend itself: a fine-tune trains the zygote-provided copy, and an
    inference job after it generates exactly what a freshly loaded model does."""
    spec = {"prompts": ["the red fox", "a quiet"], "max_new_tokens": 8, "temperature": 0}
    run_job(zygote, tmp_path / "warm", model, backend="cpu", spec=spec)
    ft_spec = {"steps": 5, "batch_size": 2, "sequence_length": 32, "learning_rate": 0.05, "seed": 0}
    inputs = {"model_path": str(model), "model_format": "hf", "dataset_path": str(demo_dataset_file),
              "dataset_format": "jsonl"}
    tuned = run_job(zygote, tmp_path / "ft", model, kind="finetune", backend="cpu", spec=ft_spec, inputs=inputs)
    checkpoint = tmp_path / "ft" / "artifacts" / "checkpoint"
    assert tuned["steps"] == 5 and fresh_checksum(checkpoint) != fresh_checksum(model)
    run_job(zygote, tmp_path / "inf", model, backend="cpu", spec=spec)
    got = [json.loads(line)["output"] for line in (tmp_path / "inf" / "artifacts" / "outputs.jsonl").open()]

    from neuron_workers.backends import get_backend
    from neuron_workers.backends.base import JobContext

    hf.clear_cache()
    ctx = JobContext(job_id=1, kind="inference", spec=spec, workdir=tmp_path / "local",
                     inputs={"model_path": str(model), "model_format": "hf"}, log=lambda _: None)
    get_backend("cpu").run(ctx)
    expected = [json.loads(line)["output"] for line in (tmp_path / "local" / "artifacts" / "outputs.jsonl").open()]
    assert got == expected
    # And the fine-tune's checkpoint is what training the file's weights gives.
    hf.clear_cache()
    ctx = JobContext(job_id=2, kind="finetune", spec=ft_spec, workdir=tmp_path / "local-ft", inputs=inputs,
                     log=lambda _: None)
    get_backend("cpu").run(ctx)
    assert fresh_checksum(tmp_path / "local-ft" / "artifacts" / "checkpoint") == fresh_checksum(checkpoint)


def test_a_request_whose_supervisor_gave_up_is_recognised():
    """The zygote drops a request whose status socket was closed while it loaded a
    model (the supervisor timed out and may run the job another way)."""
    import socket

    from neuron_workers.process.channel import peer_closed

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    assert not peer_closed(ours)
    theirs.sendall(b"x")
    assert not peer_closed(ours)  # data waiting is not EOF
    ours.recv(1)
    theirs.close()
    assert peer_closed(ours)
    ours.close()
