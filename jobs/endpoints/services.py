"""Create, change and delete endpoints: every write to an Endpoint's wanted state.
Raise EndpointInvalid (field -> messages) for input a form cannot judge alone
(a name in use, capacity, the team's limits); access.Forbidden for a viewer."""
from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from jobs import access
from jobs.endpoints import reconcile
from jobs.endpoints.forms import OPTION_FIELDS, EndpointChangeForm, EndpointCreateForm
from jobs.endpoints.timeline import endpoint_event
from jobs.lifecycle.services import SubmitRefused, check_job_limits
from jobs.models import Endpoint, EndpointRevision, Kind, Role, Team
from jobs.quotas.backfill import NO_TIME_LIMIT


class EndpointInvalid(Exception):
    def __init__(self, errors: dict[str, list[str]], message: str = ""):
        self.errors = errors
        super().__init__(message or "; ".join(f"{f}: {' '.join(m)}" for f, m in errors.items()))


def _refused_as_errors(exc: SubmitRefused, default_field: str) -> EndpointInvalid:
    field = {"cores": "cores_per_replica", "kind": default_field, "max_runtime_s": default_field}.get(
        exc.field or "", exc.field or default_field)
    return EndpointInvalid({field: [exc.message]})


def _check_team_may_serve(team: Team, user, family: str, cores: int) -> None:
    """The refusals submit makes for a job, for a replica: a host of the family that
    can hold it, and the team's hard limits (serve allowed, budget left)."""
    try:
        check_job_limits(team=team, user=user, kind=Kind.SERVE, family=family, cores=cores, runtime_s=NO_TIME_LIMIT)
    except SubmitRefused as exc:
        raise _refused_as_errors(exc, "team") from None


def _deadline():
    return timezone.now() + timedelta(seconds=settings.ENDPOINT_ROLLOUT_DEADLINE_S)


def endpoint_create(*, team: Team, user, form: EndpointCreateForm) -> Endpoint:
    """A new endpoint with its first revision; its replicas start right away."""
    access.require_role(user, team, Role.MEMBER)
    data = form.cleaned_data
    _check_team_may_serve(team, user, data["family"], data["cores_per_replica"])
    try:
        with transaction.atomic():
            endpoint = Endpoint.objects.create(
                team=team, name=data["name"], model=data["model"], family=data["family"],
                cores_per_replica=data["cores_per_replica"], min_replicas=data["min_replicas"],
                max_replicas=data["max_replicas"], desired_replicas=max(data["min_replicas"], 1),
                options=form.options(), created_by=user)
            EndpointRevision.objects.create(endpoint=endpoint, number=1, model=data["model"], options=form.options(),
                                            cores_per_replica=data["cores_per_replica"], created_by=user,
                                            deadline_at=_deadline())
            endpoint_event(endpoint.pk, "created", f"created by {user.username}: {data['model']}, "
                           f"{data['min_replicas']}-{data['max_replicas']} replicas of {data['cores_per_replica']} "
                           f"{data['family']} cores", actor=user, revision=1)
    except IntegrityError:
        raise EndpointInvalid({"name": [f"team {team.slug} already has an endpoint named {data['name']}."]}) from None
    reconcile.reconcile_endpoint(endpoint.pk)
    return endpoint


def endpoint_change(*, endpoint: Endpoint, user, form: EndpointChangeForm) -> Endpoint:
    """Apply the given fields. min / max rescale (desired is kept within them); a new
    model, options or cores per replica make a new revision, rolled out by the
    reconciler (new replicas, traffic shifted once they are ready, old ones drained;
    rolled back if they fail)."""
    access.require_role(user, endpoint.team, Role.MEMBER)
    if endpoint.state != Endpoint.State.ACTIVE:
        raise EndpointInvalid({"endpoint": [f"the endpoint is {endpoint.state}"]})
    changes = form.changes()
    if "cores_per_replica" in changes:
        _check_team_may_serve(endpoint.team, user, endpoint.family, changes["cores_per_replica"])
    with transaction.atomic():
        ep = Endpoint.objects.select_for_update(of=("self",), no_key=True).select_related("team").get(pk=endpoint.pk)
        low, high = changes.get("min_replicas", ep.min_replicas), changes.get("max_replicas", ep.max_replicas)
        options = {**(ep.options or {}), **{k: changes[k] for k in OPTION_FIELDS if k in changes}}
        model = changes.get("model", ep.model)
        cores = changes.get("cores_per_replica", ep.cores_per_replica)
        new_revision = (model != ep.model or options != (ep.options or {}) or cores != ep.cores_per_replica)
        if (low, high) != (ep.min_replicas, ep.max_replicas):
            desired = min(max(ep.desired_replicas, low), high)
            endpoint_event(ep.pk, "limits_changed", f"replicas {ep.min_replicas}-{ep.max_replicas} → {low}-{high} "
                           f"by {user.username}", actor=user, before=[ep.min_replicas, ep.max_replicas],
                           after=[low, high])
            ep.min_replicas, ep.max_replicas, ep.desired_replicas = low, high, desired
        if new_revision:
            number = (EndpointRevision.objects.filter(endpoint=ep).order_by("-number")
                      .values_list("number", flat=True).first() or 0) + 1
            EndpointRevision.objects.filter(endpoint=ep, state=EndpointRevision.State.ROLLING_OUT).update(
                state=EndpointRevision.State.SUPERSEDED, finished_at=timezone.now())
            EndpointRevision.objects.create(endpoint=ep, number=number, model=model, options=options,
                                            cores_per_replica=cores, created_by=user, deadline_at=_deadline())
            what = [f"model {ep.model} → {model}"] if model != ep.model else []
            what += [f"{k} {(ep.options or {}).get(k)} → {options[k]}" for k in OPTION_FIELDS
                     if options.get(k) != (ep.options or {}).get(k)]
            what += [f"cores per replica {ep.cores_per_replica} → {cores}"] if cores != ep.cores_per_replica else []
            endpoint_event(ep.pk, "rollout_started", f"revision {number} by {user.username}: {', '.join(what)}",
                           actor=user, revision=number)
            ep.revision, ep.model, ep.options, ep.cores_per_replica = number, model, options, cores
        ep.updated_at = timezone.now()
        ep.save(update_fields=["min_replicas", "max_replicas", "desired_replicas", "revision", "model", "options",
                               "cores_per_replica", "updated_at"])
    reconcile.reconcile_endpoint(ep.pk)
    ep.refresh_from_db()
    return ep


def endpoint_delete(*, endpoint: Endpoint, user) -> Endpoint:
    """Drain and stop every replica; the endpoint is deleted once none is left (its
    history stays for usage). Its name is free again at once."""
    access.require_role(user, endpoint.team, Role.MEMBER)
    with transaction.atomic():
        changed = Endpoint.objects.filter(pk=endpoint.pk, state=Endpoint.State.ACTIVE).update(
            state=Endpoint.State.DELETING, updated_at=timezone.now())
        if changed:
            endpoint_event(endpoint.pk, "deleting", f"deleted by {user.username}: draining its replicas", actor=user)
    reconcile.reconcile_endpoint(endpoint.pk)
    endpoint.refresh_from_db()
    return endpoint
