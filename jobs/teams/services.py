"""Writes that span models or have side effects: submit, cancel, uploads, outcomes.
Status changes go through jobs.states; messages are sent only after commit."""
from __future__ import annotations

from django.db import transaction

from jobs.models import (
    AuditEntry,
    Role,
    Team,
    quota_rows_ensure,
)

# --- teams ------------------------------------------------------------------------

def team_create(*, slug: str, name: str, actor=None, time_zone: str = "UTC") -> Team:
    """A new team with its quota rows (TeamQuota and one FamilyQuota per family, with
    the defaults: jobs.models.quota_rows_ensure, run for every new Team however it is
    created), audited."""
    with transaction.atomic():
        team = Team.objects.create(slug=slug, name=name, time_zone=time_zone)
        quota_rows_ensure(team)  # already done by the post_save signal; kept explicit (idempotent)
        AuditEntry.objects.create(team=team, actor=actor, subject="team", old="", new=f"created {slug}")
    return team


def membership_set(*, team: Team, user, role: str, actor=None) -> None:
    with transaction.atomic():
        existing = team.memberships.select_for_update().filter(user=user).first()
        old = existing.role if existing else ""
        if existing:
            existing.role = role
            existing.save(update_fields=["role"])
        else:
            team.memberships.create(user=user, role=role)
        if old != role:
            AuditEntry.objects.create(team=team, actor=actor, subject=f"member.{user.username}", old=old, new=role)


class MembershipError(Exception):
    """A membership change that would leave a team without a manager."""


def _would_orphan(team: Team, user, new_role: str | None) -> bool:
    """True if `user` is the team's only manager and would stop being one."""
    if new_role == Role.MANAGER:
        return False
    managers = list(team.memberships.select_for_update().filter(role=Role.MANAGER).values_list("user_id", flat=True))
    return managers == [user.pk]


def membership_change(*, team: Team, user, role: str | None, actor=None) -> None:
    """Set `user`'s role in `team` (role None = remove them), audited. Refuses to
    leave the team without a manager (MembershipError)."""
    with transaction.atomic():
        if _would_orphan(team, user, role):
            raise MembershipError(f"{user.username} is the only manager of team {team.slug}; "
                                  "make someone else a manager first")
        if role is not None:
            membership_set(team=team, user=user, role=role, actor=actor)
            return
        existing = team.memberships.select_for_update().filter(user=user).first()
        if existing is None:
            return
        existing.delete()
        AuditEntry.objects.create(team=team, actor=actor, subject=f"member.{user.username}", old=existing.role,
                                  new="removed")
