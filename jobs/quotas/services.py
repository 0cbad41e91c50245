"""Writes that span models or have side effects: submit, cancel, uploads, outcomes.
Status changes go through jobs.states; messages are sent only after commit."""
from __future__ import annotations

from django.db import transaction

from jobs.models import (
    AuditEntry,
    FamilyQuota,
    Team,
    TeamQuota,
    quota_rows_ensure,
)
from jobs.notify import events as notify_events
from jobs.wake import kick_dispatch

QUOTA_FIELDS = ("share", "monthly_core_hours", "max_runtime_s", "max_pending", "allowed_kinds")
FAMILY_FIELDS = ("guaranteed_cores", "borrow_limit")


def _audit_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(value) if value else "all"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def quota_update(*, team: Team, values: dict, actor=None) -> list[AuditEntry]:
    """Apply validated quota values (jobs.forms_teams.QuotaForm.quota_values: any of
    QUOTA_FIELDS, and "families": {family: {guaranteed_cores, borrow_limit}}), one
    AuditEntry per changed number (who, when, old → new). The quota rows are locked
    so two admins editing at once both get audited against the true old value. Wakes
    the scheduler after commit: a raised limit may let pending jobs start."""
    entries: list[AuditEntry] = []
    with transaction.atomic():
        quota = TeamQuota.objects.select_for_update().filter(team=team).first()
        if quota is None:
            quota_rows_ensure(team)
            quota = TeamQuota.objects.select_for_update().get(team=team)
        changed = []
        for name in QUOTA_FIELDS:
            if name in values and getattr(quota, name) != values[name]:
                entries.append(AuditEntry(team=team, actor=actor, subject=f"quota.{name}",
                                          old=_audit_value(getattr(quota, name)), new=_audit_value(values[name])))
                setattr(quota, name, values[name])
                changed.append(name)
        if changed:
            quota.save(update_fields=changed)
        for family, numbers in (values.get("families") or {}).items():
            # Not team.family_quotas.select_for_update().get_or_create(...): a queryset's
            # get_or_create does not take the related manager's team, so a missing row
            # was INSERTed with team_id NULL (a 500). Rows normally exist from the
            # team's creation (jobs.models.quota_rows_ensure); create one with the
            # defaults if not.
            fam = FamilyQuota.objects.select_for_update().filter(team=team, family=family).first()
            if fam is None:
                quota_rows_ensure(team)
                fam = FamilyQuota.objects.select_for_update().get(team=team, family=family)
            fam_changed = []
            for name in FAMILY_FIELDS:
                if name in numbers and getattr(fam, name) != numbers[name]:
                    entries.append(AuditEntry(team=team, actor=actor, subject=f"family.{family}.{name}",
                                              old=str(getattr(fam, name)), new=str(numbers[name])))
                    setattr(fam, name, numbers[name])
                    fam_changed.append(name)
            if fam_changed:
                fam.save(update_fields=fam_changed)
        AuditEntry.objects.bulk_create(entries)
        if entries:
            notify_events.quota_changed(team, [(e.subject, e.old, e.new) for e in entries], actor)
            transaction.on_commit(kick_dispatch)
    return entries
