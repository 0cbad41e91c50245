"""Issue 19: the command line says the cache's answer before anything runs
(`neurondeck submit compile --dry-run`), against a live server."""
from __future__ import annotations

import json

import pytest

from jobs.models import Job
from tests.test_cli import run  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_dry_run_says_not_cached_then_cached_and_submits_nothing(cast, tiny_model, cpu_host, run):  # noqa: F811
    args = ("submit", "compile", "--team", "vision", "--family", "cpu", "--cores", "1", "--model", str(tiny_model.pk),
            "--batch-size", "1", "--sequence-length", "16", "--dry-run")
    result = run(cast.bob, *args)
    assert result.exit_code == 0, result.output
    assert "would be accepted" in result.output and "not cached: no past cpu compiles" in result.output
    assert Job.objects.count() == 0
    answer = json.loads(run(cast.bob, *args, "--json").stdout)
    from tests.test_compile_cache import fake_artifact

    fake_artifact(cast.vision, cast.alice, tiny_model, answer["compile_cache"]["compile_key"], batch_size=1,
                  sequence_length=16)
    result = run(cast.bob, *args)
    assert "cached: done at once" in result.output and "batch_size 1, sequence_length 16" in result.output
    assert Job.objects.count() == 0
