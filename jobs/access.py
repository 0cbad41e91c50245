"""Team-scoped fetches. Every view and API endpoint that takes an id goes through
these, so another team's object is a 404 — never a 403 or a leak."""
from __future__ import annotations

from django.db.models import QuerySet
from django.http import Http404

from jobs.models import Dataset, Endpoint, Job, Membership, ModelAsset, Role, Team

ROLE_RANK = {Role.VIEWER: 0, Role.MEMBER: 1, Role.MANAGER: 2}


class Forbidden(Exception):
    """The user can see the object but their role does not allow the action."""


def teams_of(user) -> QuerySet[Team]:
    if not user.is_authenticated:
        return Team.objects.none()
    if user.is_staff:
        return Team.objects.all()
    return Team.objects.filter(memberships__user=user)


NAV_TEAMS_STAFF = 20  # base.html lists this many of a staff user's teams (all teams) and links the rest


def nav_teams(user) -> list[Team]:
    """The teams base.html's switcher lists: all of a member's teams; for staff (every
    team), the first NAV_TEAMS_STAFF and one more, which tells the template there are more."""
    teams = teams_of(user)
    return list(teams[:NAV_TEAMS_STAFF + 1] if user.is_staff else teams)


def role_in(user, team: Team) -> str | None:
    if user.is_staff:
        return Role.MANAGER
    known = getattr(team, "caller_role", None)
    if known is not None and known[0] == user.pk:
        return known[1]
    return Membership.objects.filter(team=team, user=user).values_list("role", flat=True).first()


def get_team(user, slug: str) -> Team:
    """The team `slug` if `user` belongs to it (staff: any team), else a 404.

    One query: the caller's membership with its team. The returned team keeps the
    caller's role (caller_role: user id and role), so role_in / require_role on it
    (the API checks the role, then job_submit checks it again) need no further query
    within the request."""
    if not user.is_authenticated:
        raise Http404("No such team")
    if user.is_staff:
        team = Team.objects.filter(slug=slug).first()
    else:
        membership = Membership.objects.select_related("team").filter(user=user, team__slug=slug).first()
        team = membership.team if membership is not None else None
        if team is not None:
            team.caller_role = (user.pk, membership.role)
    if team is None:
        raise Http404("No such team")
    return team


def require_role(user, team: Team, role: str) -> None:
    have = role_in(user, team)
    if have is None:
        raise Http404("No such team")
    if ROLE_RANK[have] < ROLE_RANK[role]:
        raise Forbidden(f"your role in team {team.slug} is {have}; this needs {role}")


def jobs_of(user) -> QuerySet[Job]:
    return Job.objects.filter(team__in=teams_of(user))


def get_job(user, job_id: int) -> Job:
    job = jobs_of(user).select_related("team", "user", "host", "model", "dataset", "output_model").filter(pk=job_id).first()
    if job is None:
        raise Http404("No such job")
    return job


def get_model(user, model_id: int) -> ModelAsset:
    model = ModelAsset.objects.filter(team__in=teams_of(user), pk=model_id).select_related("team", "parent").first()
    if model is None:
        raise Http404("No such model")
    return model


def get_dataset(user, dataset_id: int) -> Dataset:
    dataset = Dataset.objects.filter(team__in=teams_of(user), pk=dataset_id).first()
    if dataset is None:
        raise Http404("No such dataset")
    return dataset


def get_endpoint(user, endpoint_id: int) -> Endpoint:
    """An endpoint of one of the user's teams (a deleted one stays readable: its
    timeline and usage history), else a 404."""
    endpoint = (Endpoint.objects.filter(team__in=teams_of(user), pk=endpoint_id)
                .select_related("team", "model", "created_by").first())
    if endpoint is None:
        raise Http404("No such endpoint")
    return endpoint


def can_cancel(user, job: Job) -> bool:
    role = role_in(user, job.team)
    if role == Role.MANAGER:
        return True
    return role == Role.MEMBER and job.user_id == user.pk
