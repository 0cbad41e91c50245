"""`{% job_live_charts job %}`: the job page's live charts (NeuronCores, or CPU job
slots on a CPU host).

The job page includes templates/live/_job_charts.html with `job` in its context
(already fetched through jobs.access); this tag builds the initial figures from
the job's series and the config live.js follows. What it shows is one state for the
page as loaded and as followed live: no samples yet (a sentence, no empty axes),
samples (the charts the host can fill), or none recorded for a finished job."""
from __future__ import annotations

import redis as redis_lib
from django import template
from django.urls import reverse

from jobs.live import charts, metrics
from jobs.models import Job

register = template.Library()

NO_SAMPLES_YET = "No samples yet: the charts appear with the first sample once the job runs on a host."
NO_SAMPLES_RECORDED = ("No samples were recorded for this job: it ended before its host's agent took a sample "
                       "(one a second), or no agent watches that host.")


@register.inclusion_tag("live/_job_charts_body.html")
def job_live_charts(job: Job) -> dict:
    try:
        series = metrics.job_series(job, None)
    except redis_lib.RedisError:
        return {"job": job, "unavailable": True}
    names = charts.job_chart_names(series, job.family, job.kind)
    cpu = charts.is_cpu(series, job.family)
    config = {"url": reverse("api:job_metrics", kwargs={"job_id": job.pk}), "cursor": series["cursor"],
              "live": series["live"], "cores": series["cores"], "charts": names,
              "figures": charts.job_figures(series, job.family, names),
              "series": charts.job_series_keys(series, job.family, names),
              "points": len(series["t"]), "no_samples_recorded": NO_SAMPLES_RECORDED}
    return {"job": job, "series": series, "config": config, "names": names, "cpu": cpu,
            "no_samples_yet": NO_SAMPLES_YET, "no_samples_recorded": NO_SAMPLES_RECORDED}
