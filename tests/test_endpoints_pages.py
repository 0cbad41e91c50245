"""The endpoint pages through Django's test client: the list with its create form,
the endpoint page (URL, replicas, figures, playground, examples, timeline), change
and delete from the page, field errors, roles, another team's endpoint a 404."""
from __future__ import annotations

import re

import pytest
from django.test import Client

from jobs.models import Endpoint, Replica
from tests.endpoint_support import make_model


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


FORM = {"name": "chat", "family": "cpu", "cores_per_replica": 1, "min_replicas": 0, "max_replicas": 2,
        "max_batch_size": 8, "max_seq_len": 256, "max_concurrent": 16}


def test_bob_creates_an_endpoint_from_the_form_and_its_page_shows_how_to_call_it(cast, cpu_host):
    model = make_model(cast.vision, cast.alice, "tiny-v1")
    bob = login(cast.bob)
    page = bob.get("/teams/vision/endpoints/").content.decode()
    assert 'href="/teams/vision/endpoints/"' in page and "No endpoint yet" in page and "New endpoint" in page
    response = bob.post("/teams/vision/endpoints/", {**FORM, "model": model.pk})
    assert response.status_code == 302
    endpoint = Endpoint.objects.get(name="chat")
    assert response["Location"] == f"/endpoints/{endpoint.pk}/"
    page = bob.get(response["Location"]).content.decode()
    assert "/endpoints/vision/chat/v1" in page
    assert 'id="playground-form"' in page and "curl -N" in page and "from openai import OpenAI" in page
    assert f"job {Replica.objects.get(endpoint=endpoint).job_id}" in page
    assert "With no replica running (min 0), the first request waits" in page
    assert 'data-kind="created"' in page
    listed = bob.get("/teams/vision/endpoints/").content.decode()
    assert f'href="/endpoints/{endpoint.pk}/"' in listed


def test_a_bad_form_shows_each_error_on_its_field(cast, cpu_host):
    model = make_model(cast.vision, cast.alice, "tiny-v1")
    response = login(cast.bob).post("/teams/vision/endpoints/", {**FORM, "model": model.pk, "name": "no spaces",
                                                                  "min_replicas": 3})
    assert response.status_code == 400
    page = response.content.decode()
    assert 'id="id_name_error"' in page and 'id="id_max_replicas_error"' in page
    assert not Endpoint.objects.exists()


def test_the_page_changes_scales_and_deletes(cast, cpu_host):
    v1, v2 = make_model(cast.vision, cast.alice, "tiny-v1"), make_model(cast.vision, cast.alice, "tiny-v2")
    bob = login(cast.bob)
    bob.post("/teams/vision/endpoints/", {**FORM, "model": v1.pk})
    endpoint = Endpoint.objects.get(name="chat")
    nothing = bob.post(f"/endpoints/{endpoint.pk}/", {})
    assert nothing.status_code == 400 and "Nothing to change" in nothing.content.decode()
    assert bob.post(f"/endpoints/{endpoint.pk}/", {"model": v2.pk}).status_code == 302
    endpoint.refresh_from_db()
    assert endpoint.revision == 2 and endpoint.model_id == v2.pk
    page = bob.get(f"/endpoints/{endpoint.pk}/").content.decode()
    assert 'data-kind="rollout_started"' in page and "revision 2 by bob" in page
    assert bob.post(f"/endpoints/{endpoint.pk}/delete/").status_code == 302
    endpoint.refresh_from_db()
    assert endpoint.state in ("deleting", "deleted")


def test_a_viewer_sees_no_forms_and_charlie_gets_404(cast, cpu_host):
    model = make_model(cast.vision, cast.alice, "tiny-v1")
    login(cast.bob).post("/teams/vision/endpoints/", {**FORM, "model": model.pk})
    endpoint = Endpoint.objects.get(name="chat")
    vera = login(cast.vera)
    page = vera.get(f"/endpoints/{endpoint.pk}/").content.decode()
    assert 'id="change-endpoint"' not in page and "Delete endpoint" not in page
    assert "New endpoint" not in vera.get("/teams/vision/endpoints/").content.decode()
    assert vera.post(f"/endpoints/{endpoint.pk}/", {"min_replicas": 1}).status_code == 403
    assert vera.post(f"/endpoints/{endpoint.pk}/delete/").status_code == 403
    charlie = login(cast.charlie)
    for url in (f"/endpoints/{endpoint.pk}/", "/teams/vision/endpoints/"):
        assert charlie.get(url).status_code == 404
    assert charlie.post(f"/endpoints/{endpoint.pk}/delete/").status_code == 404
    endpoint.refresh_from_db()
    assert endpoint.state == "active"
    assert not re.search(r"chat", charlie.get("/teams/audio/endpoints/").content.decode())


def test_a_replicas_job_page_links_its_endpoint_and_offers_no_run_again(cast, cpu_host):
    model = make_model(cast.vision, cast.alice, "tiny-v1")
    bob = login(cast.bob)
    bob.post("/teams/vision/endpoints/", {**FORM, "model": model.pk})
    endpoint = Endpoint.objects.get(name="chat")
    job_id = Replica.objects.get(endpoint=endpoint).job_id
    page = bob.get(f"/jobs/{job_id}/").content.decode()
    assert f'href="/endpoints/{endpoint.pk}/"' in page and "runs until stopped" in page
    assert 'id="run-again"' not in page and 'id="same-job"' not in page


def test_the_new_job_menu_offers_only_the_kinds_people_submit(cast, cpu_host):
    page = login(cast.bob).get("/teams/vision/jobs/").content.decode()
    assert "/teams/vision/jobs/new/inference/" in page and "/jobs/new/serve/" not in page
