"""Reads of the audit log: one filtered queryset shared by the page and the CSV."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from django.db.models import Q, QuerySet
from django.utils import timezone

from jobs.models import AuditEntry

# What the page calls an area, and the subjects that belong to it (subjects start
# with their area: jobs.models.AuditEntry).
AREAS: dict[str, tuple[str, ...]] = {
    "login": ("login.",),
    "token": ("token.",),
    "quota": ("quota.", "family."),
    "member": ("member.", "staff."),
    "team": ("team",),
    "host": ("host.",),
}
CSV_COLUMNS = ["at", "area", "subject", "team", "actor", "old", "new", "ip"]
# A spreadsheet runs a cell that starts with one of these as a formula; failed-login
# usernames and token names come from outside, so such a cell is written as text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class AuditFilter:
    area: str = ""
    team: str = ""  # a team slug, or "-" for site-wide entries (no team)
    actor: str = ""
    q: str = ""
    since: date | None = None
    until: date | None = None  # inclusive


def area_of(subject: str) -> str:
    return next((area for area, prefixes in AREAS.items() if subject.startswith(prefixes)), "other")


def _day_start(day: date) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min))


def audit_entries(f: AuditFilter) -> QuerySet[AuditEntry]:
    entries = AuditEntry.objects.select_related("team", "actor").order_by("-at", "-id")
    if f.area:
        match = Q()
        for prefix in AREAS[f.area]:
            match |= Q(subject__startswith=prefix)
        entries = entries.filter(match)
    if f.team == "-":
        entries = entries.filter(team__isnull=True)
    elif f.team:
        entries = entries.filter(team__slug=f.team)
    if f.actor:
        entries = entries.filter(actor__username=f.actor)
    if f.q:
        entries = entries.filter(Q(subject__icontains=f.q) | Q(old__icontains=f.q) | Q(new__icontains=f.q))
    if f.since:
        entries = entries.filter(at__gte=_day_start(f.since))
    if f.until:
        entries = entries.filter(at__lt=_day_start(f.until + timedelta(days=1)))
    return entries


def csv_cell(value) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def csv_rows(entries: QuerySet[AuditEntry]) -> Iterator[list[str]]:
    yield CSV_COLUMNS
    for e in entries.iterator(chunk_size=2000):
        yield [csv_cell(v) for v in (e.at.isoformat(), area_of(e.subject), e.subject, e.team.slug if e.team else "",
                                     e.actor.username if e.actor else "", e.old, e.new, e.ip)]
