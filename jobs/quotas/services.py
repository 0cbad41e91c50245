"""Writes that span models or have side effects: submit, cancel, uploads, outcomes.
Status changes go through jobs.states; messages are sent only after commit."""
from __future__ import annotations

from django.db import transaction

from jobs.lifecycle.services import kick_dispatch
from jobs.models import (
    AuditEntry,
    Team,
    TeamQuota,
)

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
        quota, _ = TeamQuota.objects.select_for_update().get_or_create(team=team)
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
            fam, _ = team.family_quotas.select_for_update().get_or_create(family=family)
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
            transaction.on_commit(kick_dispatch)
    return entries
