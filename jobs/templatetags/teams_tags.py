"""Template helpers for the teams area: dict lookups for the quota table, and the
pending-job explanation the job page includes."""
from __future__ import annotations

from django import template

from jobs.models import Job

register = template.Library()


@register.filter
def get_item(mapping, key):
    """`mapping|get_item:key` (None when missing), for tables keyed by family or field."""
    try:
        return mapping.get(key)
    except AttributeError:
        return None


@register.simple_tag
def pending_explanation(job: Job) -> dict:
    """jobs.selectors.pending_explanation for a pending job ({} otherwise, so a
    finished job's page orders no queue)."""
    if job.status != Job.Status.PENDING:
        return {}
    from jobs.lifecycle.selectors import pending_explanation as explain

    return explain(job)
