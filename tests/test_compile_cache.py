"""Issue 19, parts 2-4: the cache answers before the queue (dry run, the form's
answer, the estimate with its sample size, cached configurations of the model),
"cached configurations only", the cache page's API (search, pin, who built it,
hits), the fleet cap's least-recently-used eviction that never removes a pinned
or in-use entry, and one compile per configuration at a time (claims)."""
from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import timezone

from jobs.assets.services import model_register
from jobs.compile_cache import claims, index
from jobs.compile_cache.lookup import estimate_seconds, work_size
from jobs.lifecycle import states
from jobs.models import CompileClaim, Job, ModelAsset, Team
from tests.conftest import api_client

S = Job.Status


def post(client, url, body):
    return client.post(url, data=json.dumps(body), content_type="application/json")


def compile_body(model, **extra) -> dict:
    return {"team": "vision", "kind": "compile", "family": "cpu", "cores": 1, "model": model.pk,
            "batch_size": 1, "sequence_length": 16, **extra}


def dry_run(client, body) -> dict:
    response = post(client, "/api/v1/jobs?dry_run=true", body)
    assert response.status_code == 200, response.content
    return response.json()


def fake_artifact(team: Team, user, base: ModelAsset, key: str, *, size: int = 1000, **meta) -> ModelAsset:
    """A compiled entry as a compile job registers it (files and all)."""
    dest = Path(settings.STORAGE_ROOT) / "artifacts" / key[:12]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "model.pt").write_bytes(b"x" * 10)
    return model_register(team=team, user=user, name=f"{base.name}-cpu", path=dest, digest=key[:64], size=size,
                          meta={"batch_size": 1, "sequence_length": 16, "compiler_version": "torch-2.13.0", **meta},
                          fmt=ModelAsset.Format.TORCHSCRIPT, parent=base, compile_key=key)


def past_compile(cast, model, seconds: float, **spec) -> Job:
    now = timezone.now()
    return Job.objects.create(team=cast.vision, user=cast.bob, kind="compile", family="cpu", model=model,
                              status=S.SUCCEEDED, spec={"batch_size": 1, "sequence_length": 16, **spec},
                              started_at=now - timedelta(seconds=seconds), finished_at=now)


# ---------------------------------------------------------------- the answer before the queue


def test_a_dry_run_validates_and_answers_without_creating_anything(cast, tiny_model, cpu_host):
    answer = dry_run(api_client(cast.bob), compile_body(tiny_model))
    assert answer["would_submit"] and answer["compile_cache"]["cached"] is False
    assert answer["compile_cache"]["sentence"] == "not cached: no past cpu compiles to estimate from"
    assert Job.objects.count() == 0
    bad = post(api_client(cast.bob), "/api/v1/jobs?dry_run=true", compile_body(tiny_model, batch_size=0))
    assert bad.status_code == 400 and Job.objects.count() == 0


def test_the_estimate_comes_from_past_compiles_of_similar_size_with_the_sample_size(cast, tiny_model, cpu_host):
    for seconds in (100, 120, 140):
        past_compile(cast, tiny_model, seconds)
    answer = dry_run(api_client(cast.bob), compile_body(tiny_model))["compile_cache"]
    assert answer["estimate_s"] == pytest.approx(120, rel=0.01) and answer["sample_size"] == 3
    assert answer["sentence"] == "not cached: about 2 minutes (from 3 past cpu compiles of similar size)"


def test_the_estimate_learns_how_compile_time_grows_with_size():
    # Time grows as size^0.81 here: twice the size is 2^0.81 times the time.
    history = [(work_size(1000, {"sequence_length": 16}), 10.0)] * 3 + [(work_size(1000, {"sequence_length": 4096}), 900.0)]
    seconds, sample = estimate_seconds(history, work_size(1000, {"sequence_length": 32}))
    assert sample == 4 and seconds == pytest.approx(10 * 2 ** (math.log(90) / math.log(256)), rel=1e-6)
    # Fixed-cost compiles (time flat in size) are estimated flat, not scaled up.
    flat = [(work_size(1000, {"sequence_length": n}), 5.0) for n in (8, 16, 32, 64)]
    assert estimate_seconds(flat, work_size(1000, {"sequence_length": 128}))[0] == pytest.approx(5.0)


def test_the_pre_submit_answer_agrees_with_what_submit_does(cast, tiny_model, cpu_host):
    client = api_client(cast.bob)
    first = dry_run(client, compile_body(tiny_model))["compile_cache"]
    assert first["cached"] is False
    job = post(client, "/api/v1/jobs", compile_body(tiny_model)).json()
    assert job["status"] == "pending"
    entry = fake_artifact(cast.vision, cast.alice, tiny_model, first["compile_key"])
    second = dry_run(client, compile_body(tiny_model))["compile_cache"]
    assert second["cached"] is True and second["sentence"] == "cached: done at once"
    assert second["artifact"]["model_id"] == entry.pk
    hit = post(client, "/api/v1/jobs", compile_body(tiny_model)).json()
    assert hit["status"] == "succeeded"
    entry.refresh_from_db()
    assert entry.hits == 1 and entry.last_used_at is not None


def test_the_answer_lists_the_models_cached_configurations_with_their_shapes(cast, tiny_model, cpu_host):
    fake_artifact(cast.vision, cast.alice, tiny_model, "a" * 64, batch_size=4, sequence_length=128)
    answer = dry_run(api_client(cast.bob), compile_body(tiny_model))["compile_cache"]
    (config,) = answer["configurations"]
    assert (config["batch_size"], config["sequence_length"]) == (4, 128)
    form_answer = api_client(cast.bob).get(f"/api/v1/compile-cache/answer?team=vision&model={tiny_model.pk}"
                                           f"&family=cpu&cores=1&batch_size=4&sequence_length=128")
    assert form_answer.status_code == 200 and form_answer.json()["configurations"][0]["batch_size"] == 4
    assert api_client(cast.charlie).get(f"/api/v1/compile-cache/answer?team=vision&model={tiny_model.pk}"
                                        ).status_code == 404


def test_a_team_with_cached_configurations_only_refuses_inference_on_an_uncompiled_model(cast, tiny_model, cpu_host):
    url = "/api/v1/teams/vision/compile-cache-policy"
    assert api_client(cast.bob).put(url, data='{"cached_configurations_only": true}',
                                    content_type="application/json").status_code == 403
    assert api_client(cast.charlie).put(url, data='{"cached_configurations_only": true}',
                                        content_type="application/json").status_code == 404
    for loose in ('"yes"', "1", '"true"'):  # pydantic's lax bool read these as true
        refused = api_client(cast.alice).put(url, data=f'{{"cached_configurations_only": {loose}}}',
                                             content_type="application/json")
        assert refused.status_code == 422 and "cached_configurations_only" in refused.json()["errors"], loose
    assert api_client(cast.alice).put(url, data='{"cached_configurations_only": true}',
                                      content_type="application/json").status_code == 200
    body = {"team": "vision", "kind": "inference", "family": "cpu", "cores": 1, "model": tiny_model.pk,
            "prompts": ["hi"], "max_new_tokens": 2}
    refused = post(api_client(cast.bob), "/api/v1/jobs", body)
    assert refused.status_code == 400 and "cached configurations only" in refused.content.decode()


# ---------------------------------------------------------------- the cache page's API


def test_the_cache_lists_every_configuration_with_who_built_it_and_searches(cast, tiny_model):
    fake_artifact(cast.vision, cast.alice, tiny_model, "b" * 64, task="text-generation", size=2048)
    client = api_client(cast.bob)
    page = client.get("/api/v1/compile-cache").json()
    (entry,) = page["entries"]
    assert entry["built_by"] == "alice" and entry["model"] == str(tiny_model) and entry["size_bytes"] == 2048
    assert entry["shape"] == {"batch_size": 1, "sequence_length": 16} and entry["compiler_version"] == "torch-2.13.0"
    assert page["fleet"]["size_bytes"] == 2048
    assert client.get("/api/v1/compile-cache?q=alice").json()["entries"]
    assert client.get("/api/v1/compile-cache?q=bbbb").json()["entries"]
    assert not client.get("/api/v1/compile-cache?q=nothing-like-it").json()["entries"]
    assert api_client(cast.charlie).get("/api/v1/compile-cache").json()["entries"] == []


def test_managers_pin_members_cannot_and_charlie_gets_404(cast, tiny_model):
    entry = fake_artifact(cast.vision, cast.alice, tiny_model, "c" * 64)
    url = f"/api/v1/compile-cache/{entry.pk}/pin"
    assert api_client(cast.charlie).put(url, data='{"pinned": true}', content_type="application/json").status_code == 404
    theirs = api_client(cast.charlie).get(f"/api/v1/compile-cache/{entry.pk}")
    missing = api_client(cast.charlie).get(f"/api/v1/compile-cache/{2**31 - 1}")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json() == missing.json() == {"detail": "No such cache entry", "code": "not_found"}
    assert api_client(cast.bob).put(url, data='{"pinned": true}', content_type="application/json").status_code == 403
    response = api_client(cast.alice).put(url, data='{"pinned": true}', content_type="application/json")
    assert response.status_code == 200 and response.json()["pinned"] is True


def test_eviction_removes_least_recently_used_and_never_a_pinned_or_in_use_entry(cast, tiny_model,
                                                                                 django_capture_on_commit_callbacks):
    now = timezone.now()
    entries = []
    for i, name in enumerate(("oldest", "pinned", "in-use", "old", "newest")):
        entry = fake_artifact(cast.vision, cast.alice, tiny_model, f"{i}" * 64, size=100)
        ModelAsset.objects.filter(pk=entry.pk).update(last_used_at=now - timedelta(hours=10 - i))
        entries.append(entry)
    oldest, pinned, in_use, old, newest = entries
    index.set_pinned(pinned, True)
    Job.objects.create(team=cast.vision, user=cast.bob, kind="inference", model=in_use, status=S.PENDING)
    with django_capture_on_commit_callbacks(execute=True):  # the files go after the commit
        evicted = index.enforce_cap(300)
    assert evicted == [oldest.pk, old.pk]
    assert not (Path(settings.STORAGE_ROOT) / oldest.path).exists()
    # Below what pinned + in-use take, eviction stops at them rather than remove them.
    assert index.enforce_cap(50) == [newest.pk]
    assert set(ModelAsset.objects.exclude(compile_key="").values_list("pk", flat=True)) == {pinned.pk, in_use.pk}


# ---------------------------------------------------------------- one compile per configuration


def compile_job(cast, model, key: str, status=S.RUNNING) -> Job:
    return Job.objects.create(team=cast.vision, user=cast.bob, kind="compile", family="cpu", model=model,
                              status=status, spec={"compile_key": key, "batch_size": 1, "sequence_length": 16})


def test_the_first_claim_wins_and_a_claim_of_a_finished_holder_is_taken_over(cast, tiny_model):
    first, second = compile_job(cast, tiny_model, "k" * 64), compile_job(cast, tiny_model, "k" * 64)
    assert claims.try_claim(first) and not claims.try_claim(second)
    Job.objects.filter(pk=first.pk).update(status=S.FAILED)
    assert claims.try_claim(second)
    assert CompileClaim.objects.get().job_id == second.pk


def test_a_waiter_becomes_a_cache_hit_once_the_holders_artifact_is_registered(cast, tiny_model):
    holder, waiter = compile_job(cast, tiny_model, "w" * 64), compile_job(cast, tiny_model, "w" * 64)
    assert claims.try_claim(holder)
    calls = []

    def heartbeat():
        calls.append(1)
        if len(calls) == 3:  # the holder finishes while the waiter waits
            fake_artifact(cast.vision, cast.alice, tiny_model, "w" * 64)
            claims.release(holder)

    hit = claims.await_turn(waiter, heartbeat=heartbeat, should_cancel=lambda: False, timeout_s=30)
    assert hit is not None and hit.compile_key == "w" * 64
    assert not CompileClaim.objects.exists()


# ---------------------------------------------------------------- the cache page


def page_client(user):
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client


def test_the_cache_page_lists_searches_and_lets_managers_pin(cast, tiny_model):
    entry = fake_artifact(cast.vision, cast.alice, tiny_model, "d" * 64, size=4096, task="text-generation")
    page = page_client(cast.bob).get("/teams/vision/compile-cache/")
    html = page.content.decode()
    assert page.status_code == 200 and f'data-entry="{entry.pk}"' in html and "alice" in html and "4.0\xa0KB" in html
    assert f'data-entry="{entry.pk}"' not in page_client(cast.bob).get("/teams/vision/compile-cache/?q=zzz").content.decode()
    url = f"/teams/vision/compile-cache/{entry.pk}/pin/"
    assert page_client(cast.charlie).post(url, {"pinned": "1"}).status_code == 404
    assert page_client(cast.bob).post(url, {"pinned": "1"}).status_code == 403
    assert page_client(cast.alice).post(url, {"pinned": "1"}).status_code == 302
    entry.refresh_from_db()
    assert entry.pinned


def test_the_compile_form_asks_the_cache_before_submitting(cast, tiny_model, cpu_host):
    html = page_client(cast.bob).get("/teams/vision/jobs/new/compile/").content.decode()
    assert 'id="cache-answer"' in html and "compile_cache.js" in html
    for name in ("task", "tensor_parallel_size", "auto_cast_type", "num_images_per_prompt"):
        assert f'name="{name}"' in html


def test_the_usage_page_shows_the_fleet_cache_against_its_cap(cast, tiny_model, settings):
    settings.COMPILE_CACHE_MAX_BYTES = 10 * 1024 * 1024
    fake_artifact(cast.vision, cast.alice, tiny_model, "u" * 64, size=2 * 1024 * 1024)
    html = page_client(cast.alice).get("/teams/vision/usage/").content.decode()
    assert 'data-metric="compile-cache"' in html and "2.0\xa0MB of 10.0\xa0MB cap" in html


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_the_compile_form_says_cached_or_not_as_the_shape_changes_and_a_click_picks_a_configuration(
        cast, tiny_model, cpu_host, live_server, browser):
    from playwright.sync_api import expect

    from jobs.lifecycle.services import compile_cache_key
    from tests.conftest import log_in

    key = compile_cache_key(tiny_model, {"batch_size": 2, "sequence_length": 64, "compiler_options": []}, "cpu")
    fake_artifact(cast.vision, cast.alice, tiny_model, key, batch_size=2, sequence_length=64)
    page = log_in(browser, live_server.url, "bob")
    page.goto(f"{live_server.url}/teams/vision/jobs/new/compile/")
    answer = page.locator("#cache-answer")
    expect(answer.locator("strong")).to_have_text("not cached: no past cpu compiles to estimate from")
    answer.locator("button:has-text('batch 2, length 64')").click()  # the cached configuration
    expect(page.locator("#id_sequence_length")).to_have_value("64")
    expect(answer.locator("strong")).to_have_text("cached: done at once")


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_with_several_models_the_compile_form_asks_once_one_is_chosen_and_logs_no_error(
        cast, tiny_model, cpu_host, live_server, browser):
    """The demo team has two models, so none is chosen when the form opens: it asked
    anyway and the console logged the 400 ("model: This field is required")."""
    from playwright.sync_api import expect

    from tests.conftest import log_in
    from tests.endpoint_support import make_model

    make_model(cast.vision, cast.alice, "second")
    page = log_in(browser, live_server.url, "bob")
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(f"{live_server.url}/teams/vision/jobs/new/compile/")
    expect(page.locator("#id_model")).to_have_value("")
    page.select_option("#id_model", str(tiny_model.pk))
    expect(page.locator("#cache-answer strong")).to_have_text("not cached: no past cpu compiles to estimate from")
    assert errors == []
