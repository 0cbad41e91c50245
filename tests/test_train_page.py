"""What the job page shows of a fine-tune across attempts and ranks: one loss curve
with the resumes marked, the training stages, each rank's host, last step and throughput."""
from __future__ import annotations

import json
import re

from django.utils import timezone

from jobs.lifecycle import charts, selectors, states
from jobs.models import GangMember, Host, Job, JobMetric, Kind


def test_a_resumed_two_host_finetune_shows_one_curve_its_resume_stages_and_ranks(client, cast, tiny_model, dataset):
    hosts = [Host.objects.create(name=name, family="cpu", core_ids=[0, 1], backend="cpu", memory_bytes=1 << 30,
                                 last_heartbeat=timezone.now()) for name in ("node-a", "node-b")]
    job = Job.objects.create(team=cast.vision, user=cast.bob, kind=Kind.FINETUNE, spec={"steps": 6}, family="cpu",
                             cores=4, host_count=2, model=tiny_model, dataset=dataset, status=Job.Status.RUNNING,
                             host=hosts[0], core_start=0, attempts=2)
    for rank, host in enumerate(hosts):
        GangMember.objects.create(job=job, rank=rank, host=host, cores=2)
    # Attempt 1 reached step 4 (checkpoint at 3); attempt 2 trains 4.. again and on.
    rows = [(1, 5.0), (2, 4.0), (3, 3.5), (4, 3.4), (4, 3.3), (5, 3.1)]
    JobMetric.objects.bulk_create([JobMetric(job=job, step=step, name="loss", value=value) for step, value in rows])
    JobMetric.objects.bulk_create([JobMetric(job=job, step=5, name="samples_per_s.r0", value=40.0),
                                   JobMetric(job=job, step=5, name="samples_per_s.r1", value=38.5)])
    states.event(job.pk, "resumed", "resumed from step 3 of 6", step=3, attempt=2)
    for stage, state in (("prepare", "done"), ("precompile", "skipped"), ("train", "started")):
        states.event(job.pk, "stage", f"{stage}: {state}", stage=stage, state=state, attempt=2)

    assert selectors.loss_series(job) == ([1, 2, 3, 4, 5], [5.0, 4.0, 3.5, 3.3, 3.1])  # the later attempt wins
    client.force_login(cast.bob)
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    figure = json.loads(re.search(r'<script id="loss-figure" type="application/json">(.*?)</script>', page,
                                  re.S).group(1))
    assert len(figure["data"]) == 1 and figure["data"][0]["x"] == [1, 2, 3, 4, 5]
    assert [shape["x0"] for shape in figure["layout"]["shapes"]] == [3]
    assert "resumed @3" in [a["text"] for a in figure["layout"]["annotations"]]
    stages = re.findall(r'class="stage stage-(\w+)"[^>]*><span class="stage-name">(\w+)', page)
    assert stages == [("done", "prepare"), ("skipped", "precompile"), ("started", "train"), ("waiting", "save")]
    table = page[page.index('id="rank-progress"'):]
    cells = re.findall(r"<tr><td>(\d)</td><td>([\w-]+)</td><td>(\d+)</td><td>([\d.]+)</td></tr>", table)
    assert cells == [("0", "node-a", "5", "40.0"), ("1", "node-b", "5", "38.5")]


def test_the_loss_figure_without_resumes_has_no_marks():
    figure = charts.loss_figure([1, 2], [2.0, 1.0])
    assert "shapes" not in figure["layout"] and len(figure["data"]) == 1
