"""{{ job|estimated_start:estimates }}: a pending job's start-time estimate for lists,
from `estimates` (jobs.lifecycle.forecasts.estimates_for of the page's jobs: one
read of the stored estimates for the whole page)."""
from __future__ import annotations

from django import template

from jobs.models import Job

register = template.Library()


@register.filter
def estimated_start(job: Job, estimates: dict) -> str:
    """"starts in about 12 min · estimated 20 s ago", "estimate being computed", or
    "" (no estimate because of what the reason beside it says)."""
    from jobs.lifecycle.forecasts import NO_ESTIMATE

    estimate = (estimates or {}).get(job.pk)
    if estimate is None or estimate.summary == NO_ESTIMATE:
        return ""
    return f"starts {estimate.summary} · {estimate.age}" if estimate.start else estimate.summary


@register.simple_tag
def fairshare_standing(team):
    """jobs.quotas.standing.standing for the team page."""
    from jobs.quotas.standing import standing

    return standing(team)
