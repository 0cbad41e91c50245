"""`{% job_live_charts job %}`: the job page's live NeuronCore charts.

The job page includes templates/live/_job_charts.html with `job` in its context
(already fetched through jobs.access); this tag builds the initial figures from
the job's series and the config live.js follows."""
from __future__ import annotations

import redis as redis_lib
from django import template
from django.urls import reverse

from jobs.live import charts, metrics
from jobs.models import Job

register = template.Library()


@register.inclusion_tag("live/_job_charts_body.html")
def job_live_charts(job: Job) -> dict:
    try:
        series = metrics.job_series(job, None)
    except redis_lib.RedisError:
        return {"job": job, "unavailable": True}
    config = {"url": reverse("api:job_metrics", kwargs={"job_id": job.pk}), "cursor": series["cursor"],
              "live": series["live"], "cores": series["cores"], "figures": charts.job_figures(series),
              "points": len(series["t"])}
    return {"job": job, "series": series, "config": config}
