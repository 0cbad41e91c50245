"""What a black-box probe of `make run` found (a new user following the README, a
careless client, an attacker): each case was accepted or answered badly before its fix.
Against real PostgreSQL, and SQLite (DATABASE_URL=sqlite:///...)."""
from __future__ import annotations

import json
import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from jobs.models import ApiToken, Dataset, Job, Team
from tests.auth_support import MALFORMED_AUTHORIZATION
from tests.conftest import api_client
from tests.endpoint_support import make_model


@pytest.fixture
def pipeline(cast):
    """An uncompiled diffusers pipeline, as the demo's tiny-sd."""
    model = make_model(cast.vision, cast.alice, "tiny-sd")
    model.meta = {"diffusers": True}
    model.save(update_fields=["meta"])
    return model


def test_an_inference_of_an_uncompiled_pipeline_is_refused_naming_the_model(cast, bob, bob_page, pipeline, cpu_host):
    # It was accepted and failed on the worker: "could not load a causal LM ... rag".
    body = {"team": "vision", "kind": "inference", "family": "cpu", "cores": 1, "model": pipeline.pk,
            "prompts": ["a cat"]}
    response = bob.post("/api/v1/jobs", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400, response.content
    assert "compile" in response.json()["errors"]["model"][0]
    page = bob_page.post("/teams/vision/jobs/new/inference/",
                         {"model": pipeline.pk, "prompts": "a cat", "max_new_tokens": 4, "temperature": 0,
                          "family": "cpu", "cores": 1})
    assert page.status_code == 400
    assert 'id="id_model_error"' in page.content.decode()
    assert not Job.objects.exists()


@pytest.mark.parametrize("field,literal", [("temperature", "NaN"), ("temperature", "Infinity"),
                                           ("max_new_tokens", "-Infinity"), ("temperature", "1e999")])
def test_nan_infinity_or_an_overflowing_number_in_a_body_names_the_field(cast, bob, tiny_model, cpu_host, field,
                                                                         literal):
    # Refused as "the body holds NaN, which is not JSON", naming no field.
    body = {"team": "vision", "kind": "inference", "family": "cpu", "cores": 1, "model": tiny_model.pk,
            "prompts": ["hi"], "max_new_tokens": 4, "temperature": 0}
    raw = json.dumps({**body, field: "@"}).replace('"@"', literal)
    response = bob.post("/api/v1/jobs", data=raw, content_type="application/json")
    assert response.status_code == 400, response.content
    answer = response.json()
    assert answer["field"] == field
    assert literal in answer["errors"][field][0]
    assert not Job.objects.exists()


def test_a_fields_error_is_what_its_input_is_described_by(cast, bob_page, tiny_model, dataset, cpu_host):
    # Django points aria-describedby at "<id>_error"; the list was "<id>_error", so a
    # screen reader on the field read no error.
    page = bob_page.post("/teams/vision/jobs/new/finetune/",
                         {"model": tiny_model.pk, "dataset": dataset.pk, "learning_rate": "0.001", "batch_size": 2,
                          "sequence_length": 32, "lr_schedule": "constant", "checkpoint_every": 100,
                          "keep_checkpoints": 3, "tensor_parallel_size": 1, "family": "cpu", "cores": 1})
    assert page.status_code == 400
    html = page.content.decode()
    described = re.search(r'<input[^>]*name="steps"[^>]*>', html).group(0)
    ids = re.search(r'aria-describedby="([^"]+)"', described).group(1).split()
    assert "id_steps_error" in ids
    for element_id in ids:
        assert f'id="{element_id}"' in html, element_id
    assert "Give steps or epochs" in re.search(r'id="id_steps_error">(.*?)</ul>', html, re.S).group(1)


def test_a_job_list_filters_error_is_what_its_select_is_described_by(cast, bob_page):
    html = bob_page.get("/teams/vision/jobs/?status=bogus").content.decode()
    select = re.search(r'<select[^>]*name="status"[^>]*>', html).group(0)
    assert 'aria-describedby="id_status_error"' in select
    assert re.search(r'id="id_status_error">status: .*bogus', html)


def test_a_button_address_opened_as_a_page_says_what_it_takes(cast, bob_page, tiny_model):
    # Django's 405 is an empty body: a blank page for whoever follows the address.
    job = Job.objects.create(team=cast.vision, user=cast.bob, kind="inference", model=tiny_model,
                             spec={"prompts": ["hi"]})
    response = bob_page.get(f"/jobs/{job.pk}/cancel/")
    assert response.status_code == 405 and response["Allow"] == "POST"
    html = response.content.decode()
    assert 'data-status="405"' in html and f"/jobs/{job.pk}/cancel/ takes POST, not GET" in html
    assert "Jobs of Vision" in html  # the user's navigation, as on every page
    assert "Content-Security-Policy" in response.headers
    assert bob_page.head(f"/jobs/{job.pk}/cancel/").content == b""
    api = bob_page.get(f"/api/v1/jobs/{job.pk}/cancel")
    assert api.status_code == 405 and api.json()["code"] == "method_not_allowed"


def _url_patterns(patterns=None, prefix=""):
    from django.urls import URLResolver, get_resolver

    for pattern in get_resolver().url_patterns if patterns is None else patterns:
        if isinstance(pattern, URLResolver):
            yield from _url_patterns(pattern.url_patterns, prefix + str(pattern.pattern))
        else:
            yield prefix + str(pattern.pattern)


def test_no_address_answers_a_method_it_does_not_take_as_if_it_were_get(cast, bob_page):
    # The pages that only show something (a job, the job list, a host, usage, the audit
    # log, /metrics ...) and the API's schema and docs answered PUT, DELETE, TRACE or a
    # made-up FOO with the page, 200, as a GET. (A redirect is fine: the logged-in login
    # page, the favicon; so is a 4xx of an API operation that takes PUT or DELETE.)
    admin_page = Client()
    admin_page.force_login(cast.admin)
    wrong = []
    for pattern in _url_patterns():
        if pattern.startswith("admin/"):
            continue
        path = "/" + re.sub(r"<(?:\w+:)?(\w+)>", lambda m: "vision" if m.group(1) == "slug" else "1", pattern)
        for client in (bob_page, admin_page):  # staff pages too (quotas, site usage, audit)
            for method in ("PUT", "DELETE", "TRACE", "FOO"):
                response = client.generic(method, path)
                if response.status_code < 300 or response.status_code >= 500:
                    wrong.append((method, path, response.status_code))
                elif response.status_code == 405 and not response.get("Allow"):
                    wrong.append((method, path, "405 without Allow"))
    assert wrong == []
    page = bob_page.generic("FOO", "/teams/vision/jobs/")
    assert page["Allow"] == "GET, HEAD" and 'data-status="405"' in page.content.decode()
    assert bob_page.head("/teams/vision/jobs/").status_code == 200
    for client in (bob_page, Client(enforce_csrf_checks=True)):  # without a session: not the CSRF 403 page
        for path in ("/api/v1/openapi.json", "/api/v1/docs", "/api/v1/"):
            schema = client.generic("PUT", path)
            assert schema.status_code == 405 and schema["Allow"] == "GET, HEAD", (path, schema.status_code)
            assert schema.json()["code"] == "method_not_allowed"
    assert bob_page.get("/api/v1/openapi.json").status_code == 200


@pytest.mark.parametrize("name", ["\u202egnp.exe", "two\nlines", "zero\u200bwidth"])
def test_a_dataset_name_with_a_control_or_invisible_character_is_refused(cast, bob, name):
    # A right-to-left override was stored and shown: "\u202egnp.exe" reads "exe.png".
    upload = SimpleUploadedFile("d.jsonl", b'{"text": "a"}\n')
    response = bob.post("/api/v1/datasets", data={"team": "vision", "name": name, "file": upload})
    assert response.status_code == 400, response.content
    assert "U+" in response.json()["errors"]["name"][0]
    assert not Dataset.objects.exists()


@pytest.mark.parametrize("ids,reason", [("1,abc", "'abc' is not a job id"), ("1,99999999999999999999", "is not a job id"),
                                        (",".join(["1"] * 101), "101 ids")])
def test_the_job_lists_row_refresh_names_the_id_it_cannot_read(cast, bob_page, ids, reason):
    # It answered "at most 100 comma-separated job ids" for a list of two.
    response = bob_page.get(f"/teams/vision/jobs/rows.json?ids={ids}")
    assert response.status_code == 400
    assert reason in response.json()["errors"]["ids"][0]


@pytest.mark.parametrize("name, char", [("\u202egnp.exe", "U+202E"), ("two\nlines", "U+000A")])
def test_a_token_name_with_a_control_or_invisible_character_is_refused(cast, bob_page, name, char):
    # It was stored and listed on the Tokens page and in the audit log as given.
    response = bob_page.post("/tokens/", {"name": name, "scope": "read", "expires": "7"})
    assert response.status_code == 400
    assert f"the name holds {char}" in response.content.decode()
    assert not cast.bob.api_tokens.exists()


def test_a_service_token_name_with_an_invisible_character_is_refused(cast):
    alice = Client()
    alice.force_login(cast.alice)  # alice manages vision
    response = alice.post("/tokens/", {"svc-team": "vision", "svc-name": "ci\u200b", "svc-role": "member",
                                       "svc-scope": "submit", "svc-expires": "7"})
    assert response.status_code == 400 and "U+200B (ZERO WIDTH SPACE)" in response.content.decode()
    assert not ApiToken.objects.filter(team=cast.vision).exists()


def test_a_team_name_with_a_control_or_invisible_character_is_refused(cast):
    staff = Client()
    staff.force_login(cast.admin)
    response = staff.post("/teams/new/", {"slug": "rtl", "name": "\u202emaet", "time_zone": "UTC"})
    assert response.status_code == 400
    assert "the name holds U+202E (RIGHT-TO-LEFT OVERRIDE)" in response.content.decode()
    assert not Team.objects.filter(slug="rtl").exists()
    assert staff.post("/teams/new/", {"slug": "rtl", "name": "Right to left", "time_zone": "UTC"}).status_code == 302


@pytest.mark.parametrize("header, wrong", MALFORMED_AUTHORIZATION)
def test_a_malformed_authorization_header_says_the_form_expected(cast, header, wrong):
    # They were a generic 401 "Unauthorized", even for a working token sent with two spaces.
    from jobs.teams.tokens import token_create

    raw, _ = token_create(user=cast.bob, name="t")
    response = Client(HTTP_AUTHORIZATION=header.format(token=raw)).get("/api/v1/jobs")
    assert response.status_code == 401 and response.json()["code"] == "authorization_malformed"
    detail = response.json()["detail"]
    assert detail.startswith("Authorization must be 'Bearer <token>'") and wrong in detail
    assert raw[3:] not in detail  # the secret is not echoed
    assert Client(HTTP_AUTHORIZATION=f"bearer {raw}").get("/api/v1/jobs").status_code == 200


def test_a_team_name_with_an_invisible_character_is_refused_in_the_django_admin_too(cast):
    staff = Client()
    staff.force_login(cast.admin)
    response = staff.post(f"/admin/jobs/team/{cast.vision.pk}/change/", {
        "slug": "vision", "name": "Vision\u2066", "time_zone": "UTC",
        "created_at_0": "2026-01-01", "created_at_1": "00:00:00"})
    assert response.status_code == 200 and "U+2066 (LEFT-TO-RIGHT ISOLATE)" in response.content.decode()
    cast.vision.refresh_from_db()
    assert cast.vision.name == "Vision"


SECURITY_HEADERS = ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options", "Referrer-Policy",
                    "Cross-Origin-Opener-Policy")


def test_every_answer_has_the_security_headers_an_ordinary_page_has(cast, bob, bob_page):
    # Answers made by middleware in place of a view's lacked some: the API's JSON 404 / 405
    # had no nosniff or Referrer-Policy, a NUL refused and a page's 405 no X-Frame-Options.
    page = bob_page.get("/teams/vision/jobs/")
    assert page.status_code == 200 and all(header in page for header in SECURITY_HEADERS)
    answers = {
        "API operation": bob.get("/api/v1/jobs"),
        "API 404, no such path": bob.get("/api/v1/jobs/"),
        "API 404, a word for an id": bob.get("/api/v1/jobs/abc"),
        "API 405": bob.delete("/api/v1/jobs"),
        "API HEAD": bob.head("/api/v1/jobs"),
        "NUL in a path": bob_page.get("/teams/vision%00/jobs/"),
        "NUL in a query": bob_page.get("/teams/vision/jobs/?status=%00"),
        "page 405": bob_page.get("/teams/vision/notifications/subscribe/"),
        "page 404": bob_page.get("/teams/audio/jobs/"),
    }
    missing = {what: [header for header in SECURITY_HEADERS if header not in response]
               for what, response in answers.items()}
    assert missing == {what: [] for what in answers}, {what: response.status_code for what, response in answers.items()}


def test_a_schema_read_body_refuses_a_field_it_does_not_have_naming_it(cast):
    # {"cached_configurations_only": true, "cached_only": false} was a 200 that ignored the
    # typo; the bodies the forms read already refused unknown fields.
    url = "/api/v1/teams/vision/compile-cache-policy"
    refused = api_client(cast.alice).put(url, data='{"cached_configurations_only": true, "cached_only": false}',
                                         content_type="application/json")
    assert refused.status_code == 422, refused.content
    assert refused.json()["errors"] == {"cached_only": ["unknown field"]}
    assert "cached_only: unknown field" in refused.json()["detail"]
    cast.vision.refresh_from_db()
    assert cast.vision.cached_configurations_only is False


def test_a_body_larger_than_django_reads_is_a_styled_page_or_an_api_error_saying_the_limit(cast, bob, bob_page,
                                                                                           settings):
    # The page was Django's bare "Bad Request (400)"; the API named a setting, not the limit.
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2**20
    page = bob_page.post("/teams/vision/jobs/new/inference/", {"prompts": "x" * (2**20 + 1), "max_new_tokens": 4})
    assert page.status_code == 400
    html = page.content.decode()
    assert 'id="error-page"' in html and "larger than the 1 MiB this site reads at once" in html
    assert "/teams/" in html  # the user's navigation
    answer = bob.post("/api/v1/jobs", data=json.dumps({"team": "vision", "kind": "inference",
                                                       "prompts": ["x" * (2**20 + 1)]}),
                      content_type="application/json")
    assert answer.status_code == 413 and answer.json()["code"] == "too_large"
    detail = answer.json()["detail"]
    assert "larger than the 1 MiB" in detail and "prompts_file" in detail and "settings." not in detail
    assert not Job.objects.exists()


def test_a_request_to_a_host_name_the_site_does_not_answer_to_says_so(cast):
    # Django's bare "Bad Request (400)", then the generic sentence of the styled 400.
    page = Client(HTTP_HOST="evil.example").get("/login/")
    assert page.status_code == 400
    html = page.content.decode()
    assert 'id="error-page"' in html and "host name this site does not answer to" in html
    assert "evil.example" not in html
