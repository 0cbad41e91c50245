"""Issue #14, "Found" 1-9: each input that was a 5xx (or was wrongly accepted) is now a
4xx naming the field and the reason, and a refusal leaves no row and no file.
Against real PostgreSQL (and SQLite for the 64-bit ids: DATABASE_URL=sqlite:///...)."""
from __future__ import annotations

import copy
import io
import json
import re
import zipfile
from html import unescape
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from jobs.assets import storage
from jobs.models import ApiToken, Artifact, AuditEntry, Dataset, Job, ModelAsset
from tests.conftest import api_client

S = Job.Status
DEEP = "[" * 50_000 + "]" * 50_000
MONITOR_DATA = Path(__file__).parent / "data" / "neuron-monitor"


def changes_audited() -> int:
    """Audit entries of changes (quota, membership); token uses are audited too, by design."""
    return AuditEntry.objects.exclude(subject__startswith="token.").exclude(subject__startswith="login.").count()


# --- helpers ---------------------------------------------------------------------------

def post_json(client: Client, url: str, body, *, raw: str | bytes | None = None):
    return client.post(url, data=raw if raw is not None else json.dumps(body), content_type="application/json")


def inference_body(asset, **extra) -> dict:
    return {"team": "vision", "kind": "inference", "family": "cpu", "cores": 1, "model": asset.pk,
            "prompts": ["hello"], "max_new_tokens": 4, "temperature": 0, **extra}


def finetune_body(asset, data_set, **extra) -> dict:
    return {"team": "vision", "kind": "finetune", "family": "cpu", "cores": 1, "model": asset.pk,
            "dataset": data_set.pk, "steps": 5, "learning_rate": 0.001, "batch_size": 2, "sequence_length": 32, **extra}


def refused(response, status: int, field: str | None) -> dict:
    """The response is a JSON `status` naming `field` in `errors` (and in `field`)."""
    assert response.status_code == status, response.content[:500]
    body = response.json()
    assert body["detail"]
    if field is not None:
        assert field in body["errors"], body
    return body


def page_field_errors(response, field: str) -> list[str]:
    html = response.content.decode()
    match = re.search(rf'<ul class="errorlist field-errors" id="id_{field}_error">(.*?)</ul>', html, re.S)
    return [unescape(m) for m in re.findall(r"<li>(.*?)</li>", match.group(1), re.S)] if match else []


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def zip_of(folder: Path, *, compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"tiny-gpt/{path.relative_to(folder).as_posix()}")
    return buffer.getvalue()


def corrupt_member(data: bytes, member: str, *, flip_at: int = 40) -> bytes:
    """`data` with one byte of `member`'s stored (possibly compressed) bytes flipped."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo(member)
    # local header: 30 bytes + name + extra, then the member's data
    header = data[info.header_offset:info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    at = start + min(flip_at, info.compress_size - 1)
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def stored() -> set[Path]:
    """Every file under the storage root (shared by the session's tests: compare before and after)."""
    return set(files_under(storage.root()))


# --- 1. NUL in a prompt, NUL in an artifact name ----------------------------------------

def test_a_nul_in_a_prompt_is_a_400_naming_prompts_through_the_api(cast, bob, tiny_model, cpu_host):
    body = refused(post_json(bob, "/api/v1/jobs", inference_body(tiny_model, prompts=["ok", "a\u0000b"])),
                   400, "prompts")
    assert "NUL" in body["detail"]
    assert not Job.objects.exists()


def test_a_nul_in_a_prompt_is_a_400_through_the_multipart_api_and_the_form(cast, bob, bob_page, tiny_model,
                                                                              cpu_host):
    fields = {"team": "vision", "kind": "inference", "family": "cpu", "cores": "1", "model": str(tiny_model.pk),
              "prompts": "fine\nbad \x00 prompt", "max_new_tokens": "4", "temperature": "0"}
    refused(bob.post("/api/v1/jobs", data=fields), 400, "prompts")
    page = bob_page.post("/teams/vision/jobs/new/inference/", data=fields)
    assert page.status_code == 400
    assert any("NUL" in message for message in page_field_errors(page, "prompts")), page.content[:2000]
    assert not Job.objects.exists()


@pytest.fixture
def finished_job(cast, tiny_model) -> Job:
    job = Job.objects.create(team=cast.vision, user=cast.bob, kind="inference", status=S.PENDING, model=tiny_model,
                             spec={"prompts": ["hi"]})
    out = storage.job_dir(job.pk) / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    (out / "outputs.jsonl").write_text('{"output": "hi"}\n')
    Artifact.objects.create(job=job, name="outputs.jsonl", path=storage.rel_path(out / "outputs.jsonl"),
                            size_bytes=17)
    return job


def test_a_nul_in_an_artifact_name_is_a_404_in_the_api_and_the_page(bob, bob_page, finished_job):
    assert bob.get(f"/api/v1/jobs/{finished_job.pk}/artifacts/outputs.jsonl").status_code == 200
    for name in ("outputs.jsonl%00", "%00", "outputs.jsonl%00/x"):
        assert bob.get(f"/api/v1/jobs/{finished_job.pk}/artifacts/{name}").status_code == 404
        assert bob_page.get(f"/jobs/{finished_job.pk}/artifacts/{name}").status_code == 404


# --- 2. deeply nested JSON ----------------------------------------------------------------

def test_deeply_nested_json_is_a_400_on_submit(cast, bob, tiny_model, cpu_host):
    body = refused(post_json(bob, "/api/v1/jobs", None, raw=DEEP), 400, None)
    assert "nested" in body["detail"]
    inner = json.dumps(inference_body(tiny_model)).replace('["hello"]', DEEP)
    body = refused(post_json(bob, "/api/v1/jobs", None, raw=inner), 400, None)
    assert "nested" in body["detail"]
    assert not Job.objects.exists()


def test_nesting_inside_a_field_names_the_field(cast, bob, tiny_model, cpu_host):
    nested: list = ["x"]
    for _ in range(100):
        nested = [nested]
    body = refused(post_json(bob, "/api/v1/jobs", inference_body(tiny_model, prompts=nested)), 400, "prompts")
    assert "nested" in body["detail"]


def test_deeply_nested_json_is_a_400_on_the_quota_patch(cast):
    admin = api_client(cast.admin)
    audited = changes_audited()
    response = admin.patch("/api/v1/teams/vision/quota", data=DEEP, content_type="application/json")
    assert response.status_code == 400 and "nested" in response.json()["detail"]
    deep_family = '{"families": {"cpu": ' + DEEP + "}}"
    response = admin.patch("/api/v1/teams/vision/quota", data=deep_family, content_type="application/json")
    assert response.status_code == 400 and "nested" in response.json()["detail"]
    assert changes_audited() == audited


def test_deeply_nested_json_in_a_prompts_file_line_is_a_400_naming_the_file(cast, bob, tiny_model, cpu_host):
    upload = SimpleUploadedFile("prompts.jsonl", b'{"prompt": "fine"}\n' + DEEP.encode() + b"\n")
    response = bob.post("/api/v1/jobs", data={"team": "vision", "kind": "inference", "family": "cpu", "cores": "1",
                                              "model": str(tiny_model.pk), "max_new_tokens": "4",
                                              "temperature": "0", "prompts_file": upload})
    body = refused(response, 400, "prompts_file")
    assert "line 2" in body["detail"] and "nested" in body["detail"]
    upload = SimpleUploadedFile("prompts.jsonl", b'{"prompt": "a\\u0000b"}\n')
    body = refused(bob.post("/api/v1/jobs", data={"team": "vision", "kind": "inference", "model": str(tiny_model.pk),
                                                  "prompts_file": upload}), 400, "prompts_file")
    assert "NUL" in body["detail"]
    assert not Job.objects.exists()


def test_deeply_nested_json_in_a_dataset_line_is_a_400_and_stores_nothing(cast, bob):
    before = stored()
    upload = SimpleUploadedFile("train.jsonl", b'{"text": "a"}\n{"text": "b", "meta": ' + DEEP.encode() + b"}\n")
    body = refused(bob.post("/api/v1/datasets", data={"team": "vision", "name": "deep", "file": upload}), 400, "file")
    assert "line 2" in body["detail"] and "nested" in body["detail"]
    assert not Dataset.objects.exists()
    assert stored() == before


# --- 3. corrupt model archives -----------------------------------------------------------

@pytest.mark.parametrize("how", ["crc", "deflate"])
def test_a_corrupt_model_archive_is_a_400_and_stores_nothing(cast, bob, bob_page, tiny_model_dir, how):
    before = stored()
    if how == "crc":  # stored member whose bytes no longer match its CRC: BadZipFile
        data = corrupt_member(zip_of(tiny_model_dir, compression=zipfile.ZIP_STORED), "tiny-gpt/model.safetensors")
    else:  # deflated member that no longer inflates: zlib.error
        data = corrupt_member(zip_of(tiny_model_dir), "tiny-gpt/model.safetensors", flip_at=2)
    response = bob.post("/api/v1/models", data={"team": "vision", "name": "broken",
                                                "file": SimpleUploadedFile("m.zip", data)})
    body = refused(response, 400, "file")
    assert "corrupt" in body["detail"] and "model.safetensors" in body["detail"]
    page = bob_page.post("/teams/vision/models/", data={"name": "broken", "file": SimpleUploadedFile("m.zip", data)})
    assert page.status_code == 400
    assert any("corrupt" in message for message in page_field_errors(page, "file")), page.content[:3000]
    assert not ModelAsset.objects.exists()
    assert stored() == before


def test_a_corrupt_config_json_is_refused_by_name(cast, bob, tiny_model_dir, tmp_path):
    before = stored()
    folder = tmp_path / "m"
    folder.mkdir()
    for path in tiny_model_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    deep = json.dumps(config)[:-1] + ', "task_specific_params": ' + "[" * 2000 + "]" * 2000 + "}"
    for bad in (json.dumps({**config, "n_positions": "many"}), json.dumps({**config, "model_type": "gpt2\u0000"}),
                deep, "{not json"):
        (folder / "config.json").write_text(bad)
        response = bob.post("/api/v1/models", data={"team": "vision", "name": "cfg",
                                                    "file": SimpleUploadedFile("m.zip", zip_of(folder))})
        body = refused(response, 400, "file")
        assert "config.json" in body["detail"]
    assert not ModelAsset.objects.exists() and stored() == before


# --- 4. ids, counts and sizes are integers -----------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("model", True), ("model", 1.5), ("model", 1.0), ("model", "1"), ("model", [1]), ("model", {"id": 1}),
    ("cores", True), ("cores", 1.5), ("cores", "1"), ("max_new_tokens", False), ("seed", 2.0),
    ("temperature", True), ("temperature", "0.5"), ("family", 5), ("prompts", 5),
])
def test_json_ids_counts_and_sizes_take_integers_only(cast, bob, tiny_model, cpu_host, field, value):
    """`true` was a job on model 1. Decision: a JSON body is typed, so an integer
    field takes a JSON integer only (not a bool, a float, or a string such as "1";
    the form-encoded body is text and takes "1")."""
    assert tiny_model.pk is not None
    body = refused(post_json(bob, "/api/v1/jobs", inference_body(tiny_model, **{field: value})), 400, field)
    assert field in body["detail"]
    assert not Job.objects.exists()


def test_the_form_encoded_api_and_the_form_take_text_numbers(cast, bob, tiny_model, cpu_host):
    fields = {"team": "vision", "kind": "inference", "cores": "1", "model": str(tiny_model.pk), "prompts": "hi"}
    assert bob.post("/api/v1/jobs", data=fields).status_code == 201


@pytest.mark.parametrize("value", [2**63, 2**64 + 1, 10**30, -(2**63) - 1, 0, -1])
def test_a_model_or_dataset_id_beyond_64_bits_is_a_400_not_a_500(cast, bob, bob_page, tiny_model, dataset, cpu_host,
                                                                   value):
    """On SQLite (make run's default) such an id overflowed in the query (a 500)."""
    refused(post_json(bob, "/api/v1/jobs", inference_body(tiny_model, model=value)), 400, "model")
    refused(post_json(bob, "/api/v1/jobs", finetune_body(tiny_model, dataset, dataset=value)), 400, "dataset")
    page = bob_page.post("/teams/vision/jobs/new/inference/", data={
        "family": "cpu", "cores": "1", "model": str(value), "prompts": "hi", "max_new_tokens": "4", "temperature": "0"})
    assert page.status_code == 400 and page_field_errors(page, "model")
    page = bob_page.post("/teams/vision/jobs/new/finetune/", data={
        "family": "cpu", "cores": "1", "model": str(tiny_model.pk), "dataset": str(value), "steps": "5",
        "learning_rate": "0.001", "batch_size": "2", "sequence_length": "32"})
    assert page.status_code == 400 and page_field_errors(page, "dataset")
    assert bob.get(f"/api/v1/models/{value}").status_code in (404, 422)
    assert bob.get(f"/api/v1/datasets/{value}").status_code in (404, 422)
    assert not Job.objects.exists()


# --- 5. 401 rather than a CSRF 403 --------------------------------------------------------

def test_a_post_without_credentials_is_a_401_saying_so(cast, tiny_model):
    # enforce_csrf_checks: as a real client is treated (the test client skips CSRF by default)
    response = Client(enforce_csrf_checks=True).post("/api/v1/jobs", data=json.dumps(inference_body(tiny_model)),
                             content_type="application/json")
    assert response.status_code == 401
    assert "CSRF" not in response.json()["detail"] and "token" in response.json()["detail"].lower()
    assert Client(enforce_csrf_checks=True).post("/api/v1/jobs/1/cancel").status_code == 401
    assert Client(enforce_csrf_checks=True).patch("/api/v1/teams/vision/quota", data="{}", content_type="application/json").status_code == 401
    assert not Job.objects.exists()


def test_a_post_with_a_revoked_token_is_a_401_saying_so(cast, tiny_model):
    from jobs.teams.tokens import token_create, token_revoke

    raw, token = token_create(user=cast.bob, name="gone")
    client = Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert client.get("/api/v1/jobs").status_code == 200
    token_revoke(token=token, actor=cast.bob)
    response = client.post("/api/v1/jobs", data=json.dumps(inference_body(tiny_model)), content_type="application/json")
    assert response.status_code == 401, response.content
    assert "revoked" in response.json()["detail"] and response["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/api/v1/jobs").json()["detail"] == response.json()["detail"]
    assert not Job.objects.exists()


def test_a_signed_in_browser_without_a_csrf_token_still_gets_the_csrf_403(cast, tiny_model):
    client = Client(enforce_csrf_checks=True)
    client.force_login(cast.bob)
    response = client.post("/api/v1/jobs", data=json.dumps(inference_body(tiny_model)), content_type="application/json")
    assert response.status_code == 403 and "CSRF" in response.json()["detail"]
    assert not Job.objects.exists()


# --- 6 and 7. the neuron-monitor reader ---------------------------------------------------

def _raw(name: str) -> dict:
    return json.loads((MONITOR_DATA / name).read_text().splitlines()[0])


def test_utilization_outside_0_100_is_clamped_and_counted():
    from neuron_workers.readers.neuron_monitor import parse_report

    raw = _raw("trn1.32xlarge-two-jobs.jsonl")
    in_use = raw["neuron_runtime_data"][0]["report"]["neuroncore_counters"]["neuroncores_in_use"]
    in_use["0"]["neuroncore_utilization"] = -4
    in_use["1"]["neuroncore_utilization"] = 180
    sample = parse_report(json.dumps(raw))
    assert sample["cores"]["0"]["util"] == 0.0 and sample["cores"]["1"]["util"] == 100.0
    assert sample["runtimes"][0]["util"]["0"] == 0.0 and sample["runtimes"][0]["util"]["1"] == 100.0
    assert sample["anomalies"]["util_out_of_range"] == 2
    clean = parse_report(json.dumps(_raw("trn1.32xlarge-two-jobs.jsonl")))
    assert "anomalies" not in clean  # the documented shape is unchanged for a clean report


def test_the_reader_keeps_a_running_count_of_anomalies():
    from neuron_workers.readers import neuron_monitor

    raw = _raw("trn1.32xlarge-two-jobs.jsonl")
    raw["neuron_runtime_data"][0]["report"]["neuroncore_counters"]["neuroncores_in_use"]["0"][
        "neuroncore_utilization"] = 1e6
    before = neuron_monitor.anomaly_counts().get("util_out_of_range", 0)
    neuron_monitor.parse_report(json.dumps(raw))
    assert neuron_monitor.anomaly_counts()["util_out_of_range"] == before + 1


def test_the_agent_logs_the_anomalies_of_its_samples_at_most_once_a_period(caplog):
    from neuron_workers.agent import logging_anomalies
    from neuron_workers.readers.neuron_monitor import parse_report

    raw = _raw("trn1.32xlarge-two-jobs.jsonl")
    raw["neuron_runtime_data"][0]["report"]["neuroncore_counters"]["neuroncores_in_use"]["0"][
        "neuroncore_utilization"] = 180
    bad, clean = parse_report(json.dumps(raw)), parse_report(json.dumps(_raw("trn1.32xlarge-two-jobs.jsonl")))
    with caplog.at_level("WARNING", logger="neuron_workers.agent"):
        passed = list(logging_anomalies([clean, bad, bad, clean], every_s=3600))
    assert passed == [clean, bad, bad, clean]
    logged = [r.getMessage() for r in caplog.records if "anomalies" in r.getMessage()]
    assert len(logged) == 1 and "util_out_of_range" in logged[0] and "since start" in logged[0]


def test_memory_of_another_runtimes_core_is_not_charged_to_a_runtime():
    """job-41 holds cores 0-7 and job-42 cores 8-9; a breakdown in job-41's report that
    lists core 8 does not make core 8 job-41's, nor count core 8's memory twice."""
    from neuron_workers.readers.neuron_monitor import JobPlacement, attribute, parse_report

    raw = _raw("trn1.32xlarge-two-jobs.jsonl")
    first, second = raw["neuron_runtime_data"]
    breakdown = second["report"]["memory_used"]["neuron_runtime_used_bytes"]["usage_breakdown"][
        "neuroncore_memory_usage"]
    core8 = sum(breakdown["8"].values())
    first["report"]["memory_used"]["neuron_runtime_used_bytes"]["usage_breakdown"]["neuroncore_memory_usage"][
        "8"] = copy.deepcopy(breakdown["8"])

    sample = parse_report(json.dumps(raw))

    by_tag = {rt["tag"]: rt for rt in sample["runtimes"]}
    assert by_tag["job-41"]["cores"] == list(range(8))
    assert by_tag["job-42"]["cores"] == [8, 9]
    assert sample["cores"]["8"]["mem"] == core8
    assert sample["anomalies"]["mem_of_foreign_core"] == 1
    result = attribute(sample, [JobPlacement(41, None, list(range(8))), JobPlacement(42, None, [8, 9])])
    assert sorted(result["by_job"][41]["cores"], key=int) == [str(c) for c in range(8)]
    assert sorted(result["by_job"][42]["cores"], key=int) == ["8", "9"]


def test_an_idle_core_reported_by_two_runtimes_belongs_to_neither_and_counts_once():
    from neuron_workers.readers.neuron_monitor import parse_report

    raw = _raw("trn1.32xlarge-two-jobs.jsonl")
    first, second = raw["neuron_runtime_data"]
    parts = {"constants": 10, "model_code": 20, "model_shared_scratchpad": 0, "runtime_memory": 0, "tensors": 5}
    for runtime in (first, second):
        runtime["report"]["memory_used"]["neuron_runtime_used_bytes"]["usage_breakdown"][
            "neuroncore_memory_usage"]["20"] = dict(parts)

    sample = parse_report(json.dumps(raw))

    assert sample["cores"]["20"]["mem"] == 35 and sample["cores"]["20"]["util"] == 0.0
    assert all(20 not in rt["cores"] for rt in sample["runtimes"])


# --- 8. Redis down --------------------------------------------------------------------------

@pytest.fixture
def redis_down(settings):
    from jobs.live import store

    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    store.redis.cache_clear()
    yield
    store.redis.cache_clear()


def test_live_endpoints_answer_503_with_a_reason_when_redis_is_down(cast, bob, bob_page, finished_job, cpu_host,
                                                                     redis_down):
    for url in ("/api/v1/hosts", f"/api/v1/hosts/{cpu_host.name}/metrics", f"/api/v1/jobs/{finished_job.pk}/metrics",
                "/api/v1/fleet", "/api/v1/fleet?family=cpu"):
        response = bob.get(url)
        assert response.status_code == 503, (url, response.content)
        assert "Redis" in response.json()["detail"] and response.json()["code"] == "live_data_unavailable"
        assert response["Retry-After"]
    assert bob_page.get("/fleet/figure.json").status_code == 503
    for url in ("/hosts/", f"/hosts/{cpu_host.name}/", "/fleet/", f"/jobs/{finished_job.pk}/"):
        page = bob_page.get(url)
        assert page.status_code == 200, url


# --- 9. content types; NUL bytes in datasets ---------------------------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/octet-stream"])
def test_a_body_that_is_not_json_by_its_content_type_is_a_415(cast, bob, tiny_model, cpu_host, content_type):
    audited = changes_audited()
    response = bob.post("/api/v1/jobs", data=json.dumps(inference_body(tiny_model)), content_type=content_type)
    assert response.status_code == 415, response.content
    assert content_type in response.json()["detail"]
    admin = api_client(cast.admin)
    response = admin.patch("/api/v1/teams/vision/quota", data='{"max_pending": 3}', content_type=content_type)
    assert response.status_code == 415 and content_type in response.json()["detail"]
    assert not Job.objects.exists() and changes_audited() == audited


def test_json_with_a_charset_parameter_is_still_json(cast, bob, tiny_model, cpu_host):
    response = bob.post("/api/v1/jobs", data=json.dumps(inference_body(tiny_model)),
                        content_type="application/json; charset=utf-8")
    assert response.status_code == 201, response.content


@pytest.mark.parametrize("filename,data", [
    ("train.jsonl", b'{"text": "a"}\n{"text": "b\x00c"}\n'),
    ("train.jsonl", b'{"text": "a\\u0000"}\n'),
    ("train.csv", b"text\nhello\nwor\x00ld\n"),
])
def test_a_dataset_with_a_nul_is_refused(cast, bob, bob_page, filename, data):
    before = stored()
    body = refused(bob.post("/api/v1/datasets", data={"team": "vision", "name": "nul",
                                                      "file": SimpleUploadedFile(filename, data)}), 400, "file")
    assert "NUL" in body["detail"]
    page = bob_page.post("/teams/vision/datasets/", data={"name": "nul", "file": SimpleUploadedFile(filename, data)})
    assert page.status_code == 400 and any("NUL" in m for m in page_field_errors(page, "file"))
    assert not Dataset.objects.exists()
    assert stored() == before


# --- 10. found by probing a running install from outside ------------------------------------

def wsgi(method: str, path: str, **headers) -> tuple[str, dict[str, str], bytes]:
    """The request through the WSGI application itself, as gunicorn calls it (the test
    client and Django's own server remove a HEAD response's body; gunicorn does not)."""
    from wsgiref.util import setup_testing_defaults

    from django.core import signals
    from django.db import close_old_connections

    from webapp.wsgi import application

    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "SERVER_NAME": "testserver",
               **{f"HTTP_{k.upper()}": v for k, v in headers.items()}}
    setup_testing_defaults(environ)
    answer: dict = {}

    def start_response(status, response_headers, exc_info=None):
        answer.update(status=status, headers=dict(response_headers))

    # Keep the test's database connection (and its transaction) across the request.
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        result = application(environ, start_response)
        body = b"".join(result)
        getattr(result, "close", lambda: None)()
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)
    return answer["status"], answer["headers"], body


def test_a_head_request_is_answered_with_headers_and_no_body(cast, finished_job):
    from jobs.teams.tokens import token_create

    bearer = f"Bearer {token_create(user=cast.bob, name='head')[0]}"
    for path in ("/login/", "/api/v1/teams", f"/api/v1/jobs/{finished_job.pk}",
                 f"/api/v1/jobs/{finished_job.pk}/artifacts/outputs.jsonl"):  # the last one streams a file
        status, headers, body = wsgi("GET", path, authorization=bearer)
        assert status.startswith("200") and body, (path, status)
        head_status, head_headers, head_body = wsgi("HEAD", path, authorization=bearer)
        assert head_status == status and head_body == b"", path  # an API GET answers HEAD too (was a 405)
        assert head_headers.get("Content-Type") == headers.get("Content-Type")
        if "Content-Length" in headers:
            assert head_headers["Content-Length"] == headers["Content-Length"] == str(len(body))


def test_the_api_answers_json_for_a_path_it_lacks_and_a_method_it_does_not_take(bob):
    missing = bob.get("/api/v1/no-such-thing")
    assert missing.status_code == 404 and missing["Content-Type"] == "application/json"
    assert missing.json()["code"] == "not_found" and "/api/v1/no-such-thing" in missing.json()["detail"]
    assert "/api/v1/docs" in bob.get("/api/v1/").json()["detail"]  # the README's "the API lives at /api/v1/"
    wrong = bob.delete("/api/v1/teams")
    assert wrong.status_code == 405 and wrong["Allow"] == "GET" and wrong.json()["code"] == "method_not_allowed"
    assert "DELETE" in wrong.json()["detail"]
    assert bob.put("/api/v1/jobs").json()["code"] == "method_not_allowed"


@pytest.mark.parametrize("written", [" {pk}", "{pk} ", "+{pk}", "{pk}%0A", "{pk}.0", "%D9%A1"])
def test_an_id_in_an_api_path_is_ascii_digits_only(cast, bob, finished_job, written):
    """int() reads " 1", "+1", "1\\n" and "1_0" (pydantic did, so /api/v1/jobs/%201 was job 1)."""
    assert bob.get(f"/api/v1/jobs/{finished_job.pk}").status_code == 200
    path = "/api/v1/jobs/" + written.format(pk=finished_job.pk)
    for method in ("get", "post"):
        answer = getattr(bob, method)(path + ("/cancel" if method == "post" else ""))
        assert answer.status_code == 404 and answer.json()["code"] == "not_found", (method, path)
    assert Job.objects.get(pk=finished_job.pk).status == S.PENDING


@pytest.mark.parametrize("query", ["dry_run=on", "dry_run=ture", "dry_run=true&dry_run=false", "dry_run=2"])
def test_a_dry_run_that_is_not_clearly_yes_or_no_is_refused_not_submitted(cast, bob, tiny_model, cpu_host, query):
    refused(post_json(bob, f"/api/v1/jobs?{query}", inference_body(tiny_model)), 400, "dry_run")
    assert not Job.objects.exists()


def test_a_dry_run_says_yes_or_no_in_a_few_words(cast, bob, tiny_model, cpu_host):
    for yes in ("true", "TRUE", "1", "yes"):
        assert post_json(bob, f"/api/v1/jobs?dry_run={yes}", inference_body(tiny_model)).status_code == 200
    assert not Job.objects.exists()
    assert post_json(bob, "/api/v1/jobs?dry_run=false", inference_body(tiny_model)).status_code == 201


@pytest.mark.parametrize("field,value", [("same_network", "yes"), ("same_network", 1), ("same_network", []),
                                         ("same_network", {}), ("precompile", "false"), ("zero_1", 0)])
def test_a_yes_no_field_takes_json_true_or_false_only(cast, bob, tiny_model, dataset, cpu_host, field, value):
    """The form's BooleanField reads any non-empty value as yes: "false" was true."""
    body = refused(post_json(bob, "/api/v1/jobs?dry_run=true", finetune_body(tiny_model, dataset, **{field: value})),
                   400, field)
    assert "true or false" in body["errors"][field][0]
    assert post_json(bob, "/api/v1/jobs?dry_run=true",
                     finetune_body(tiny_model, dataset, same_network=False, precompile=False)).status_code == 200


def test_a_fine_tune_of_a_text_to_image_pipeline_is_refused(cast, bob, dataset, cpu_host):
    from tests.endpoint_support import make_model

    pipeline = make_model(cast.vision, cast.alice, "tiny-sd")
    pipeline.meta = {"diffusers": True}
    pipeline.save(update_fields=["meta"])
    refused(post_json(bob, "/api/v1/jobs?dry_run=true", finetune_body(pipeline, dataset)), 400, "model")
    assert not Job.objects.exists()


@pytest.mark.parametrize("body,field", [
    ({"max_runtime_s": "١٠٠"}, "max_runtime_s"),  # int() reads Arabic-Indic digits: it saved 100
    ({"monthly_core_hours": "100"}, "monthly_core_hours"),
    ({"families": {"cpu": {"guaranteed_cores": "4"}}}, "cpu_guaranteed_cores"),
    ({"families": {"cpu": {"borrow_limit": True}}}, "cpu_borrow_limit"),
])
def test_a_quota_patch_takes_json_numbers_only(cast, body, field):
    before = changes_audited()
    refused(api_client(cast.admin).patch("/api/v1/teams/vision/quota", data=json.dumps(body),
                                         content_type="application/json"), 400, field)
    assert changes_audited() == before
