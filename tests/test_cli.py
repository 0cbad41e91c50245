"""The `neurondeck` command line against a live server (pytest-django's live_server)
and a real Celery worker: every command, its --json form, and its errors."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import zipfile
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs.cli.main import cli
from jobs.models import Dataset, Family, Job, ModelAsset
from jobs.quotas.services import quota_update
from jobs.teams.tokens import token_create
from tests.conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def run(live_server, tmp_path, monkeypatch):
    """Run the CLI as a user: `run(user, *args)` -> click Result. Each user's login
    lives in a config directory of its own under tmp_path."""
    monkeypatch.delenv("NEURONDECK_URL", raising=False)
    monkeypatch.delenv("NEURONDECK_TOKEN", raising=False)
    tokens: dict[str, str] = {}

    def invoke(user, *args: str, login: bool = True, input: str | None = None):
        home = tmp_path / f"home-{user.username}"
        env = {"XDG_CONFIG_HOME": str(home / ".config"), "HOME": str(home)}
        if login and user.username not in tokens:
            tokens[user.username] = token_create(user=user, name="cli")[0]
            result = CliRunner().invoke(cli, ["login", live_server.url, "--token", tokens[user.username]], env=env)
            assert result.exit_code == 0, result.output
        return CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)

    invoke.tokens = tokens
    return invoke


def as_json(result) -> dict | list:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_login_checks_the_token_and_keeps_it_readable_by_its_owner_only(cast, run, live_server, tmp_path):
    result = run(cast.bob, "login", live_server.url, "--token", "nd_not-a-token", login=False)
    assert result.exit_code == 1 and "401" in result.output and "log in again" in result.output

    raw, _ = token_create(user=cast.bob, name="laptop")
    result = run(cast.bob, "login", live_server.url, login=False, input=f"{raw}\n")
    assert result.exit_code == 0 and "vision (member)" in result.output
    home = tmp_path / "home-bob"
    path = next(home.rglob("config.json"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"url": live_server.url, "token": raw}


def test_login_to_a_wrong_address_says_what_to_give(cast, run, live_server):
    raw, _ = token_create(user=cast.bob, name="laptop")
    # a URL copied from the browser with its page: the page's 404 is not the API's
    copied = run(cast.bob, "login", f"{live_server.url}/teams/vision/jobs/", "--token", raw, login=False)
    assert copied.exit_code == 1 and "no NeuronDeck API at" in copied.output and "without a path" in copied.output
    # another scheme was read as a host named "ftp"
    other = run(cast.bob, "login", "ftp://example.org", "--token", raw, login=False)
    assert other.exit_code == 2 and "not an http:// or https:// address" in other.output
    # another web server, answering 200 with a page: an error naming the address, not a traceback
    with _page_server() as url:
        page = run(cast.bob, "login", url, "--token", raw, login=False)
    assert page.exit_code == 1 and f"{url} answered GET /api/v1/teams with text/html" in page.output, page.output
    assert run(cast.bob, "list", login=False).exit_code == 1  # nothing was stored


@contextmanager
def _page_server():
    """A web server that is not NeuronDeck: every GET is a 200 HTML page."""
    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>It works!</html>")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_command_before_login_says_how_to_log_in(cast, run):
    result = run(cast.bob, "list", login=False)
    assert result.exit_code == 1 and "neurondeck login URL" in result.output


def test_submit_wait_logs_status_list_and_clone_run_a_real_job(cast, tiny_model, cpu_host, celery_worker_proc, run):
    submitted = as_json(run(cast.bob, "submit", "inference", "--model", str(tiny_model.pk), "--prompt", "hello",
                            "--prompt", "world", "--max-new-tokens", "4", "--json"))
    assert submitted["team"] == "vision" and submitted["kind"] == "inference"  # bob's only team by default
    job_id = submitted["id"]

    waited = run(cast.bob, "wait", str(job_id), "--timeout", "120", "--json")
    assert waited.exit_code == 0, waited.output
    assert json.loads(waited.stdout)["status"] == "succeeded"
    assert Job.objects.get(pk=job_id).status == Job.Status.SUCCEEDED

    log = run(cast.bob, "logs", str(job_id), "-f")
    assert log.exit_code == 0 and log.stdout == "".join(c.text for c in Job.objects.get(pk=job_id).log_chunks
                                                        .order_by("offset"))
    status = run(cast.bob, "status", str(job_id))
    assert status.exit_code == 0 and "succeeded" in status.output and "timeline:" in status.output
    listed = as_json(run(cast.bob, "list", "--json"))
    assert [item["id"] for item in listed["items"]] == [job_id]
    table = run(cast.bob, "list")
    assert table.output.splitlines()[0].split()[:4] == ["ID", "TEAM", "KIND", "STATUS"]
    assert f"{job_id}" in table.output.splitlines()[1]

    clone = as_json(run(cast.bob, "clone", str(job_id), "--set", "max_new_tokens=2", "--wait", "--json"))
    again = Job.objects.get(pk=clone["id"])
    assert again.pk != job_id and again.status == Job.Status.SUCCEEDED
    assert again.spec["max_new_tokens"] == 2 and again.spec["prompts"] == ["hello", "world"]


def test_submit_from_a_job_file_with_flags_overriding_it(cast, tiny_model, cpu_host, celery_worker_proc, run,
                                                         tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(f"team: vision\nkind: inference\nfamily: cpu\nmodel: {tiny_model.pk}\n"
                        "prompts: [one, two, three]\nmax_new_tokens: 8\n")
    result = run(cast.bob, "submit", "-f", str(job_file), "--max-new-tokens", "3", "--wait")
    assert result.exit_code == 0, result.output
    job = Job.objects.get()
    assert job.status == Job.Status.SUCCEEDED and job.spec["max_new_tokens"] == 3
    assert job.spec["prompts"] == ["one", "two", "three"]


def test_a_refused_submit_shows_the_api_s_sentence_and_field(cast, tiny_model, run):
    result = run(cast.bob, "submit", "inference", "--model", str(tiny_model.pk), "--prompt", "x",
                 "--family", "trn1")
    assert result.exit_code == 1
    assert "no trn1 host is registered" in result.output and "family:" in result.output
    assert not Job.objects.exists()


def test_pending_explains_a_wait_and_a_cancelled_job_makes_wait_exit_1(cast, tiny_model, cpu_host, run):
    quota_update(team=cast.vision, values={"families": {Family.CPU: {"guaranteed_cores": 0, "borrow_limit": 0}}})
    job_id = as_json(run(cast.bob, "submit", "inference", "--model", str(tiny_model.pk), "--prompt", "x",
                         "--json"))["id"]
    from jobs.lifecycle import scheduler

    scheduler.dispatch()
    why = run(cast.bob, "pending", str(job_id))
    assert why.exit_code == 0 and f"job {job_id} is pending" in why.output
    assert as_json(run(cast.bob, "pending", str(job_id), "--json"))["reason_code"]

    cancelled = run(cast.bob, "cancel", str(job_id))
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.output
    waited = run(cast.bob, "wait", str(job_id))
    assert waited.exit_code == 1 and f"job {job_id} cancelled" in waited.output
    ended = run(cast.bob, "pending", str(job_id))  # said "job N is cancelled: " (an empty reason)
    assert ended.exit_code == 0 and ended.output.strip() == f"job {job_id} is cancelled: it is not waiting"


def test_another_team_s_job_is_not_found(cast, tiny_model, cpu_host, run):
    job_id = as_json(run(cast.bob, "submit", "inference", "--model", str(tiny_model.pk), "--prompt", "x",
                         "--json"))["id"]
    for command in ("status", "logs", "pending", "cancel", "wait", "clone"):
        result = run(cast.charlie, command, str(job_id))
        assert result.exit_code == 1 and "No such job [HTTP 404]" in result.output, (command, result.output)
    assert Job.objects.count() == 1


def test_models_and_datasets_list_and_upload(cast, tiny_model, tiny_model_dir, demo_dataset_file, run, tmp_path):
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in tiny_model_dir.rglob("*"):
            if path.is_file():
                zf.write(path, path.relative_to(tiny_model_dir))
    uploaded = as_json(run(cast.bob, "models", "upload", str(archive), "--name", "mine", "--json"))
    assert ModelAsset.objects.get(pk=uploaded["id"]).name == "mine"
    models = as_json(run(cast.bob, "models", "--json"))
    assert {m["name"] for m in models["items"]} == {"tiny-gpt", "mine"}
    assert "tiny-gpt" in run(cast.bob, "models").output

    data = as_json(run(cast.bob, "datasets", "upload", str(demo_dataset_file), "--name", "demo", "--json"))
    assert Dataset.objects.get(pk=data["id"]).rows == data["rows"] > 0
    assert [d["name"] for d in as_json(run(cast.bob, "datasets", "--json"))["items"]] == ["demo"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    result = run(cast.bob, "datasets", "upload", str(bad), "--name", "bad")
    assert result.exit_code == 1 and "400" in result.output
    assert Dataset.objects.count() == 1


def test_usage_reads_the_team_s_numbers(cast, run):
    doc = as_json(run(cast.alice, "usage", "--team", "vision", "--json"))
    assert doc["team"] == "vision" and "totals" in doc
    text = run(cast.alice, "usage", "--team", "vision")
    assert text.exit_code == 0 and "team vision" in text.output
    assert "None" not in text.output and "utilization_pct: -" in text.output  # no use measured: no figure
    assert run(cast.charlie, "usage", "--team", "vision").exit_code == 1


def test_the_installed_command_runs(tmp_path):
    """`make install` puts `neurondeck` in the virtualenv (pip install -e .)."""
    exe = Path(sys.executable).with_name("neurondeck")
    assert exe.exists(), "run `make install`: the neurondeck command is missing"
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path)}
    env.pop("NEURONDECK_URL", None)
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0 and "neurondeck login URL" in done.stdout
    done = subprocess.run([str(exe), "list"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 1 and "not logged in" in done.stderr
