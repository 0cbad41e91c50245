"""Writes that span models or have side effects: submit, cancel, uploads, outcomes.
Status changes go through jobs.states; messages are sent only after commit."""
from __future__ import annotations

import logging
from importlib import metadata

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs import access
from jobs.lifecycle import states
from jobs.lifecycle.forms import JobBaseForm
from jobs.models import (
    Family,
    Host,
    Job,
    Kind,
    ModelAsset,
    Role,
    Team,
    TeamQuota,
)
from jobs.quotas.placement import HostSlots, largest_request
from jobs.quotas.policy import SubmitLimits, SubmitState, check_gang_request, check_submit
from jobs.quotas.selectors import LOOK_UP, core_hours_bound, core_hours_for_budget, user_budget_hours, user_cap
from jobs.wake import kick_dispatch

log = logging.getLogger(__name__)


class SubmitRefused(Exception):
    """A submission refused by a hard limit: a 4xx with a reason code and a sentence."""

    def __init__(self, code: str, message: str, field: str | None = None, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.field, self.status = code, message, field, status


# --- submit -----------------------------------------------------------------------

def compiler_version(family: str) -> str:
    """The compiler identity that goes into the compile cache key: torch for the cpu
    backend; for Neuron families, what that family's hosts report (neuronx-cc)."""
    if family == Family.CPU:
        try:
            return f"torch-{metadata.version('torch')}"
        except metadata.PackageNotFoundError:
            return "torch-unknown"
    versions = {(h.inventory or {}).get("compiler_version") for h in Host.objects.filter(family=family)}
    versions.discard(None)
    return sorted(versions)[-1] if versions else "neuronx-cc-unknown"


def compile_cache_key(model: ModelAsset, spec: dict, family: str) -> str:
    from neuron_workers.backends.compiler_options import compile_cache_key as key
    from neuron_workers.backends.export_options import check_export_options

    backend = "cpu" if family == Family.CPU else "neuron"
    return key(model.digest, spec["batch_size"], spec["sequence_length"], spec.get("compiler_options") or [],
               backend, compiler_version(family), family, check_export_options(spec, family).key_extras())


def _family_hosts(family: str) -> tuple[list[HostSlots], list[dict]]:
    """The family's hosts as placement sees them, and their inventories (one query)."""
    rows = list(Host.objects.filter(family=family).values_list("pk", "name", "family", "core_ids", "network",
                                                               "inventory"))
    return ([HostSlots(pk, name, fam, tuple(core_ids), network=network) for pk, name, fam, core_ids, network, _ in rows],
            [inventory or {} for *_, inventory in rows])


def _check_neuron_software(kind: str, family: str, cores: int, data: dict, spec: dict,
                           inventories: list[dict]) -> None:
    """Refuse a job no host of the family can run, with the reason: the Neuron software
    its job Python reported at registration (neuron_workers.backends.neuron_matrix:
    native TorchNeuron only on Trn2/Trn3, no XLA training from Neuron 2.30, compiled
    artifacts need the XLA torch-neuronx, trn2 logical cores must agree, trn1
    collectives take 1, 2, 8 or 32 cores)."""
    if family == Family.CPU:
        return
    from neuron_workers.backends.neuron_matrix import fleet_refusal

    model = data.get("model")
    refusal = fleet_refusal(kind, family, cores, [(inv.get("software"), inv.get("lnc")) for inv in inventories],
                            model_format=model.format if model else "hf",
                            compiler_options=spec.get("compiler_options") or (),
                            model_lnc=(model.meta or {}).get("logical_nc_config") if model else None)
    if refusal is not None:
        raise SubmitRefused(refusal.code, refusal.message, refusal.field)


def _check_capacity(family: str, cores: int, hosts: list[HostSlots], host_count: int = 1,
                    same_network: bool = False) -> None:
    """Refuse a request no registered host of `family` could ever hold (a gang:
    jobs.quotas.policy.check_gang_request)."""
    if host_count > 1:
        decision = check_gang_request(family, cores, host_count, same_network, hosts)
        if not decision.ok:
            raise SubmitRefused(decision.code, decision.sentence, decision.field)
        return
    largest = largest_request(hosts, family)
    if cores > largest:
        if not hosts:
            raise SubmitRefused("no_hosts_of_family", f"no {family} host is registered; choose another family", "family")
        raise SubmitRefused("request_too_large",
                            f"no {family} host can ever hold {cores} contiguous cores; the largest available is {largest}",
                            "cores")


def _admissible(team: Team, user, form: JobBaseForm) -> tuple[dict, str, str, int, dict]:
    """The refusals that hold whatever the team's current use: the caller's role, a
    request no host of the family could ever hold, a job the family's Neuron software
    cannot run. Returns the form's data, kind, family, cores and spec."""
    try:
        access.require_role(user, team, Role.MEMBER)
    except access.Forbidden as exc:
        raise SubmitRefused("forbidden", str(exc), status=403) from None
    data = form.cleaned_data
    kind, family, cores = form.kind, data["family"], data["cores"]
    spec = form.spec()
    hosts, inventories = _family_hosts(family)
    _check_capacity(family, cores, hosts, data.get("host_count") or 1, bool(data.get("same_network")))
    # The Neuron software checks one host's share (a gang's processes each see their host's cores).
    _check_neuron_software(kind, family, cores // (data.get("host_count") or 1), data, spec, inventories)
    return data, kind, family, cores, spec


def _check_limits(team: Team, user, kind: str, cores: int, runtime: int, quota: TeamQuota,
                  used_core_hours: float) -> None:
    """The hard limits (jobs.quotas.policy.check_submit): the team's allowed kinds, max
    pending, monthly budget and max runtime, and the user's own cap in the team if
    an admin set one (UserBudget; read with the quota row when it was annotated with
    user_budget_hours)."""
    decision = check_submit(
        team.slug, kind, runtime,
        SubmitLimits(tuple(quota.allowed_kinds or ()), quota.max_pending, quota.monthly_core_hours, quota.max_runtime_s),
        SubmitState(Job.objects.filter(team=team, status=Job.Status.PENDING).count(), used_core_hours),
        user_cap(team, user, monthly_core_hours=getattr(quota, "user_cap_hours", LOOK_UP)), cores,
    )
    if not decision.ok:
        raise SubmitRefused(decision.code, decision.sentence, LIMIT_FIELDS.get(decision.code))


# The form field a refusal is about, where there is one.
LIMIT_FIELDS = {"kind_not_allowed": "kind", "runtime_too_long": "max_runtime_s", "user_budget_exceeded": "max_runtime_s"}


def check_job_limits(*, team: Team, user, kind: str, family: str, cores: int, runtime_s: int) -> None:
    """What submit refuses before it creates a job, for jobs another area creates (an
    endpoint's replicas): no host of the family could hold it, or the hard limits
    (allowed kinds, max pending, budgets, max runtime). Raises SubmitRefused."""
    hosts, _ = _family_hosts(family)
    _check_capacity(family, cores, hosts)
    quota = TeamQuota.objects.get(team=team)
    _check_limits(team, user, kind, cores, runtime_s, quota,
                  core_hours_for_budget({team.pk: quota.monthly_core_hours})[team.pk])


def job_submit(*, team: Team, user, form: JobBaseForm) -> Job:
    """Create a pending job (and its event) from a valid form, or raise SubmitRefused.

    The team's quota row is locked (SELECT … FOR UPDATE) from the check of its
    limits to the insert, so concurrent submissions of the same team are serialized
    and cannot together exceed max_pending. SQLite has no row locks: its IMMEDIATE
    transactions serialize writers. Everything no submit changes is done before the
    lock (the caller's role, the family's hosts, an upper bound of the month's use,
    the row to insert), so the team's submits wait for each other only while one
    reads its quota, counts its pending jobs and inserts."""
    data, kind, family, cores, spec = _admissible(team, user, form)
    cache_hit = None
    if kind == Kind.COMPILE:
        spec["compile_key"] = compile_cache_key(data["model"], spec, family)
        cache_hit = ModelAsset.objects.filter(team=team, compile_key=spec["compile_key"]).first()
    bounds = core_hours_bound([team.pk])
    job = Job(team=team, user=user, kind=kind, spec=spec, family=family, cores=cores,
              host_count=data.get("host_count") or 1, same_network=bool(data.get("same_network")),
              model=data.get("model"), dataset=data.get("dataset"), max_attempts=_max_attempts(),
              reason_code="submitted", reason="waiting for the scheduler")

    with transaction.atomic():
        quota = (TeamQuota.objects.select_for_update().annotate(user_cap_hours=user_budget_hours(user))
                 .get(team=team))
        # Exact (queries, under the lock: the budget is the locked row's) only for a team
        # the bound puts near its budget.
        used = core_hours_for_budget({team.pk: quota.monthly_core_hours}, bounds=bounds)[team.pk]
        runtime = data.get("max_runtime_s") or quota.max_runtime_s
        _check_limits(team, user, kind, cores, runtime, quota, used)
        job.max_runtime_s = runtime
        job.save(force_insert=True)
        states.event(job.pk, Job.Status.PENDING, f"submitted by {user.username}", actor=user)
        if cache_hit is None:
            transaction.on_commit(kick_dispatch)  # once the job is committed, with the caller's transaction if any
        else:
            _finish_as_cache_hit(job, cache_hit)
    if kind == Kind.INFERENCE and data["model"].compile_key:
        # The compile cache's LRU, after the lock: eviction is kept off a model a job
        # uses by the job's foreign key, not by this stamp.
        ModelAsset.objects.filter(pk=data["model"].pk).update(last_used_at=timezone.now())
    if cache_hit is not None:
        # Only a cache hit changed the row after the insert; otherwise the instance
        # already holds what was inserted.
        job.refresh_from_db()
    return job


def job_dry_run(*, team: Team, user, form: JobBaseForm) -> dict:
    """What submit would answer, creating nothing: the refusals job_submit makes before
    its insert (role, capacity, the family's Neuron software, the team's hard limits,
    raised as SubmitRefused) and, for a compile, the compile cache's answer
    (jobs.compile_cache.lookup). Without the quota lock: a dry run promises nothing."""
    from jobs.compile_cache.lookup import compile_answer

    data, kind, family, cores, spec = _admissible(team, user, form)
    quota = TeamQuota.objects.get(team=team)
    _check_limits(team, user, kind, cores, data.get("max_runtime_s") or quota.max_runtime_s, quota,
                  core_hours_for_budget({team.pk: quota.monthly_core_hours})[team.pk])
    host_count = data.get("host_count") or 1
    answer: dict = {"dry_run": True, "would_submit": True, "kind": kind, "family": family, "cores": cores,
                    "host_count": host_count, "same_network": bool(data.get("same_network")), "spec": spec}
    if kind == Kind.COMPILE:
        key = compile_cache_key(data["model"], spec, family)
        answer["spec"]["compile_key"] = key
        answer["compile_cache"] = compile_answer(team, data["model"], spec, family, key)
    if not (answer.get("compile_cache") or {}).get("cached"):  # a cache hit never waits for cores
        from jobs.lifecycle.whatif import placement_answer

        answer.update(placement_answer(team=team, kind=kind, family=family, cores=cores,
                                       runtime_s=data.get("max_runtime_s") or quota.max_runtime_s,
                                       host_count=host_count, same_network=bool(data.get("same_network"))))
    return answer


def _max_attempts() -> int:
    return settings.JOB_MAX_ATTEMPTS


def _finish_as_cache_hit(job: Job, artifact: ModelAsset) -> None:
    from jobs.compile_cache.index import record_hit

    record_hit(artifact.pk)
    result = {"cache_hit": True, "artifact_model_id": artifact.pk, "artifact": str(artifact),
              "source_job_id": artifact.source_job_id, **{k: v for k, v in (artifact.meta or {}).items()
                                                            if k in ("compile_seconds", "latency_ms_p50", "latency_ms_p95")}}
    states.mark_finished(job.pk, Job.Status.SUCCEEDED, sources=(Job.Status.PENDING,),
                         message=f"compile cache hit: {artifact} (from job {artifact.source_job_id})",
                         result=result, cache_hit=True, output_model=artifact)


# --- cancel -----------------------------------------------------------------------

def job_cancel(*, job: Job, user) -> bool:
    """Cancel is a database fact: pending/queued jobs end now; a running job's worker
    sees cancel_requested and stops it (or the reaper does, if the worker is gone).
    Works with Redis down. Returns False if the job had already finished."""
    if not access.can_cancel(user, job):
        raise access.Forbidden("only the job's owner or a team manager can cancel it")
    with transaction.atomic():
        updated = Job.objects.filter(pk=job.pk, status__in=[*Job.ACTIVE, Job.Status.PENDING, Job.Status.SUSPENDED]
                                     ).update(cancel_requested=True)
        if not updated:
            return False
        done = states.mark_finished(job.pk, Job.Status.CANCELLED,
                                    sources=(Job.Status.PENDING, Job.Status.QUEUED, Job.Status.SUSPENDED),
                                    message=f"cancelled by {user.username}", actor=user, failure="cancelled")
        if not done:
            states.event(job.pk, "cancel_requested", f"cancel requested by {user.username}", actor=user)
    return True




# --- suspend and resume -------------------------------------------------------------

class NotSuspendable(Exception):
    """A suspend or resume that does not apply to the job as it is (a 409 with a sentence)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def job_suspend(*, job: Job, user) -> None:
    """Suspend a fine-tune: it leaves the queue or stops running and frees its cores; a
    running one saves a checkpoint in its kill grace. Whoever may cancel the job may
    suspend it. Only fine-tunes: they resume where they were, other kinds would start over."""
    if not access.can_cancel(user, job):
        raise access.Forbidden("only the job's owner or a team manager can suspend it")
    if job.kind != Kind.FINETUNE:
        raise NotSuspendable("not_suspendable", f"only fine-tune jobs can be suspended (they resume from their "
                                                f"checkpoint); job {job.pk} is of kind {job.kind}")
    if not states.suspend(job.pk, actor=user, message=f"suspended by {user.username}"):
        job.refresh_from_db(fields=["status", "cancel_requested"])
        state = "being cancelled" if job.cancel_requested and not job.is_finished else job.status
        raise NotSuspendable("not_suspendable", f"job {job.pk} is {state}; only a pending, queued or running "
                                                f"job can be suspended")
    transaction.on_commit(kick_dispatch)  # the cores it held are free for the queue


def job_resume(*, job: Job, user) -> None:
    """Put a suspended job back in the queue; a fine-tune resumes from its newest checkpoint."""
    if not access.can_cancel(user, job):
        raise access.Forbidden("only the job's owner or a team manager can resume it")
    if not states.resume(job.pk, actor=user, message=f"resumed by {user.username}; back in the queue"):
        job.refresh_from_db(fields=["status"])
        raise NotSuspendable("not_suspended", f"job {job.pk} is {job.status}, not suspended; nothing to resume")
    transaction.on_commit(kick_dispatch)
