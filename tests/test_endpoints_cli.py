"""`neurondeck endpoints …` against a live server: create, list, show, scale, roll out,
delete, and the API's field errors printed as they are."""
from __future__ import annotations

import json

import pytest

from jobs.models import Endpoint, Replica
from tests.endpoint_support import make_model
from tests.test_cli import run  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def as_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_endpoint_commands_create_scale_roll_out_and_delete(cast, cpu_host, run):
    v1, v2 = make_model(cast.vision, cast.alice, "tiny-v1"), make_model(cast.vision, cast.alice, "tiny-v2")
    created = as_json(run(cast.bob, "endpoints", "create", "chat", "--model", str(v1.pk), "--max", "2",
                          "--max-batch-size", "4", "--json"))
    assert created["options"]["max_batch_size"] == 4 and created["url"].endswith("/endpoints/vision/chat/v1")
    listed = run(cast.bob, "endpoints", "list")
    assert listed.exit_code == 0 and "chat" in listed.output
    assert as_json(run(cast.bob, "endpoints", "scale", str(created["id"]), "--min", "2", "--json"))[
        "desired_replicas"] == 2
    rolled = as_json(run(cast.bob, "endpoints", "rollout", str(created["id"]), "--model", str(v2.pk), "--json"))
    assert rolled["revision"] == 2
    shown = run(cast.bob, "endpoints", "show", str(created["id"]))
    assert shown.exit_code == 0 and "REPLICA" in shown.output
    assert "None" not in shown.output and "TTFT p50 - p95 -" in shown.output  # no request yet: no figure
    bad = run(cast.bob, "endpoints", "scale", str(created["id"]), "--min", "5")
    assert bad.exit_code == 1 and "min_replicas" in bad.output
    assert run(cast.charlie, "endpoints", "show", str(created["id"])).exit_code == 1
    gone = run(cast.bob, "endpoints", "delete", str(created["id"]))
    assert gone.exit_code == 0 and ("deleting" in gone.output or "deleted" in gone.output)
    assert Endpoint.objects.get(pk=created["id"]).state != "active"
    assert Replica.objects.filter(endpoint_id=created["id"]).count() == 4
