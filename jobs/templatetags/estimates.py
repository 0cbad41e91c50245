"""{{ job|estimated_start }}: a pending job's start-time estimate for lists (the
one replay jobs.lifecycle.forecasts caches for a few seconds serves the whole page)."""
from __future__ import annotations

from django import template

from jobs.models import Job

register = template.Library()


@register.filter
def estimated_start(job: Job) -> str:
    if job.status != Job.Status.PENDING:
        return ""
    from jobs.lifecycle.forecasts import estimate_for

    estimate = estimate_for(job)
    return f"starts {estimate.summary}" if estimate and estimate.start else ""


@register.simple_tag
def fairshare_standing(team):
    """jobs.quotas.standing.standing for the team page."""
    from jobs.quotas.standing import standing

    return standing(team)
