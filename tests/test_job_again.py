"""The job page shows a job as a `neurondeck submit` command, a job file and a curl
call (jobs.cli.jobfile, the rule `neurondeck clone` uses too): each, submitted, makes a
job with the same spec. "Run again" opens the submit form prefilled with the job."""
from __future__ import annotations

import html
import json
import re
import shlex
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner
from django.test import Client

from jobs.cli import main as cli_main
from jobs.cli.jobfile import job_body
from jobs.lifecycle.forms import JOB_FORMS
from jobs.models import Job
from tests.conftest import api_client

pytestmark = pytest.mark.django_db

ODD_PROMPTS = ["Hello", "it's \"quoted\" $HOME `x`", "--not-a-flag", "true", "naïve ünïcode ✓", "  spaced  "]


class RoutedApi:
    """What `neurondeck` talks to, routed into the Django test client (no server)."""

    url = "http://testserver"

    def __init__(self, client: Client):
        self.client = client

    def _answer(self, response):
        assert response.status_code in (200, 201), response.content
        return response.json()

    def get(self, path, **params):
        return self._answer(self.client.get(f"/api/v1{path}", {k: v for k, v in params.items() if v is not None}))

    def post(self, path, body=None):
        return self._answer(self.client.post(f"/api/v1{path}", json.dumps(body or {}),
                                             content_type="application/json"))


def _submit(client: Client, body: dict) -> Job:
    response = client.post("/api/v1/jobs", json.dumps(body), content_type="application/json")
    assert response.status_code == 201, response.content
    return Job.objects.get(pk=response.json()["id"])


def _shown(page: str, element_id: str) -> str:
    match = re.search(rf'<pre class="command" id="{element_id}">(.*?)</pre>', page, re.S)
    assert match, f"no #{element_id} on the page"
    return html.unescape(match.group(1))


def _same(a: Job, b: Job) -> None:
    assert b.pk != a.pk
    assert (b.team_id, b.kind, b.family, b.cores, b.max_runtime_s, b.model_id, b.dataset_id) == \
           (a.team_id, a.kind, a.family, a.cores, a.max_runtime_s, a.model_id, a.dataset_id)
    assert b.spec == a.spec


def _bodies(cast, tiny_model, dataset) -> list[dict]:
    return [
        {"team": "vision", "kind": "inference", "model": tiny_model.pk, "prompts": ODD_PROMPTS,
         "max_new_tokens": 3, "temperature": 0.7, "seed": 5, "max_runtime_s": 600},
        {"team": "vision", "kind": "finetune", "model": tiny_model.pk, "dataset": dataset.pk, "steps": 2,
         "learning_rate": 2e-05, "batch_size": 2, "sequence_length": 16, "cores": 2},
        {"team": "vision", "kind": "compile", "model": tiny_model.pk, "batch_size": 1, "sequence_length": 16},
    ]


def test_command_job_file_and_curl_on_the_page_submit_the_same_spec(cast, cpu_host, tiny_model, dataset, monkeypatch,
                                                                     tmp_path):
    client = api_client(cast.bob)
    monkeypatch.setattr(cli_main, "_api", lambda: RoutedApi(client))
    page_client = Client()
    page_client.force_login(cast.bob)
    for original_body in _bodies(cast, tiny_model, dataset):
        original = _submit(client, original_body)
        page = page_client.get(f"/jobs/{original.pk}/").content.decode()
        assert _shown(page, "again-clone") == f"neurondeck clone {original.pk}"

        command = shlex.split(_shown(page, "again-command"))
        assert command[:3] == ["neurondeck", "submit", original.kind]
        result = CliRunner().invoke(cli_main.cli, [*command[1:], "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        _same(original, Job.objects.get(pk=json.loads(result.stdout)["id"]))

        job_file = tmp_path / f"{original.kind}.yaml"
        job_file.write_text(_shown(page, "again-file"))
        result = CliRunner().invoke(cli_main.cli, ["submit", "-f", str(job_file), "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        _same(original, Job.objects.get(pk=json.loads(result.stdout)["id"]))

        curl = shlex.split(_shown(page, "again-curl"))
        assert curl[:5] == ["curl", "-H", "Authorization: Bearer $NEURONDECK_TOKEN", "-H",
                            "Content-Type: application/json"]
        url = urlsplit(curl[-1])
        assert url.netloc == "testserver" and url.path == "/api/v1/jobs"
        _same(original, _submit(client, json.loads(curl[curl.index("-d") + 1])))

        # neurondeck clone reads the API's document through the same rule
        result = CliRunner().invoke(cli_main.cli, ["clone", str(original.pk), "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        _same(original, Job.objects.get(pk=json.loads(result.stdout)["id"]))


def test_the_body_names_only_fields_the_submit_form_knows(cast, cpu_host, tiny_model, dataset):
    client = api_client(cast.bob)
    for body in _bodies(cast, tiny_model, dataset):
        job = _submit(client, body)
        again = job_body({"team": job.team.slug, "kind": job.kind, "family": job.family, "cores": job.cores,
                          "max_runtime_s": job.max_runtime_s, "spec": job.spec})
        assert set(again) - {"team", "kind"} <= set(JOB_FORMS[job.kind].base_fields)


def test_run_again_prefills_the_form_and_only_from_the_teams_job(cast, cpu_host, tiny_model):
    job = _submit(api_client(cast.bob), {"team": "vision", "kind": "inference", "model": tiny_model.pk,
                                         "prompts": ["one", "two"], "max_new_tokens": 7, "temperature": 0.5})
    bob = Client()
    bob.force_login(cast.bob)
    page = bob.get(f"/jobs/{job.pk}/").content.decode()
    link = html.unescape(re.search(r'id="run-again" class="button" href="([^"]+)"', page).group(1))
    assert link == f"/teams/vision/jobs/new/inference/?again={job.pk}"
    form = bob.get(link).context["form"]
    assert form.initial["prompts"] == "one\ntwo" and form.initial["max_new_tokens"] == 7
    assert form.initial["temperature"] == 0.5 and form.initial["model"] == tiny_model.pk
    # another kind's form, or another team's job: nothing prefilled, no error
    assert "prompts" not in bob.get(f"/teams/vision/jobs/new/finetune/?again={job.pk}").context["form"].initial
    charlie = Client()
    charlie.force_login(cast.charlie)
    response = charlie.get(f"/teams/audio/jobs/new/inference/?again={job.pk}")
    assert response.status_code == 200 and "prompts" not in response.context["form"].initial
    # a viewer sees the commands but no Run again button
    vera = Client()
    vera.force_login(cast.vera)
    page = vera.get(f"/jobs/{job.pk}/").content.decode()
    assert 'id="run-again"' not in page and 'id="again-command"' in page
