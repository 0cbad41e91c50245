"""NeuronDeck's records. PostgreSQL is the source of truth: a Job row exists before
any message is sent, and every state change is a row update plus a JobEvent
(see jobs.states, the one module that changes Job.status)."""
from __future__ import annotations

import hashlib
import secrets
import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from jobs.validators import shown_as_is


class Family(models.TextChoices):
    INF2 = "inf2", "Inferentia2"
    TRN1 = "trn1", "Trainium"
    TRN2 = "trn2", "Trainium2"
    CPU = "cpu", "CPU"


class Kind(models.TextChoices):
    COMPILE = "compile", "Compile"
    FINETUNE = "finetune", "Fine-tune"
    INFERENCE = "inference", "Inference"
    SERVE = "serve", "Endpoint replica"  # a long-running model server (jobs.endpoints), no time limit


class Role(models.TextChoices):
    VIEWER = "viewer", "Viewer"
    MEMBER = "member", "Member"
    MANAGER = "manager", "Manager"


class Team(models.Model):
    slug = models.SlugField(unique=True, max_length=64)
    name = models.CharField(max_length=120, validators=[shown_as_is])
    time_zone = models.CharField(max_length=64, default="UTC")
    # Inference only from compiled configurations already in the cache (as optimum-cli
    # neuron serve loads a precompiled model): an HF folder is refused at submit.
    cached_configurations_only = models.BooleanField(default=False)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, through="Membership", related_name="teams")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Membership(models.Model):
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "user"], name="uniq_membership")]

    def __str__(self) -> str:
        return f"{self.user} in {self.team} ({self.role})"


class TeamQuota(models.Model):
    """Per-team hard limits, checked at submit."""

    team = models.OneToOneField(Team, on_delete=models.CASCADE, related_name="quota")
    monthly_core_hours = models.FloatField(default=1000.0)  # NeuronCore-hours per calendar month
    max_runtime_s = models.PositiveIntegerField(default=24 * 3600)
    max_pending = models.PositiveIntegerField(default=100)
    allowed_kinds = models.JSONField(default=list)  # empty = all kinds
    # Fair-share weight: the scheduler orders teams by decayed recent usage / share,
    # so a team with share 2 may use twice as much before it yields to a team with 1.
    share = models.PositiveIntegerField(default=1)

    def allows(self, kind: str) -> bool:
        return not self.allowed_kinds or kind in self.allowed_kinds


class FamilyQuota(models.Model):
    """Per team and family: guaranteed cores and how far the team may borrow idle ones."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="family_quotas")
    family = models.CharField(max_length=8, choices=Family.choices)
    guaranteed_cores = models.PositiveIntegerField(default=0)
    borrow_limit = models.PositiveIntegerField(default=0)  # extra cores beyond the guarantee

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "family"], name="uniq_family_quota")]

    @property
    def max_cores(self) -> int:
        return self.guaranteed_cores + self.borrow_limit


# A new team's quota rows: (guaranteed cores, borrowing limit) per family. Every team
# has a TeamQuota and one FamilyQuota per family from the moment it exists, however
# it was created (the console, the Django admin, a script): see quota_rows_ensure.
DEFAULT_FAMILY_QUOTA: dict[str, tuple[int, int]] = {Family.CPU: (8, 8)}
DEFAULT_NEURON_FAMILY_QUOTA = (0, 32)


def default_family_quota(family: str) -> tuple[int, int]:
    return DEFAULT_FAMILY_QUOTA.get(family, DEFAULT_NEURON_FAMILY_QUOTA)


def quota_rows_ensure(team: Team) -> None:
    """Create the team's TeamQuota and its missing FamilyQuota rows with the defaults
    (existing rows are left as they are; safe to repeat and to race)."""
    TeamQuota.objects.bulk_create([TeamQuota(team=team)], ignore_conflicts=True)
    FamilyQuota.objects.bulk_create(
        [FamilyQuota(team=team, family=family, guaranteed_cores=default_family_quota(family)[0],
                     borrow_limit=default_family_quota(family)[1]) for family in Family.values],
        ignore_conflicts=True)


@receiver(post_save, sender=Team, dispatch_uid="team_quota_rows")
def _team_created(sender, instance: Team, created: bool, raw: bool = False, **kwargs) -> None:
    if created and not raw:  # raw: loaddata brings its own rows
        quota_rows_ensure(instance)


class AuditEntry(models.Model):
    """Who changed what, old → new: a team's quota or membership (team set), or a
    site-wide event with no team (logins, API tokens, host drains; `ip` says from
    where). Subjects start with their area: quota., family., member., staff. (staff
    status set by single sign-on), team, login., token., host."""

    team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.CASCADE, related_name="audit")
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    at = models.DateTimeField(default=timezone.now, db_index=True)
    subject = models.CharField(max_length=120)  # e.g. "quota.monthly_core_hours", "family.trn1.guaranteed_cores", "member.bob"
    old = models.CharField(max_length=200, blank=True)
    new = models.CharField(max_length=200, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)  # the client's address, for logins and tokens

    class Meta:
        ordering = ["-at", "-id"]
        verbose_name_plural = "audit entries"


class ApiToken(models.Model):
    """An API token. Only a SHA-256 of it is stored; it is shown once. A person's token
    acts as that person; a team's token (`team` set: a service account for CI) acts as
    a user of its own, a member of that team only, so it outlives whoever created it.
    Its scope caps what it may do below the user's role: read < submit < manage."""

    class Scope(models.TextChoices):
        READ = "read", "read: look only"
        SUBMIT = "submit", "submit: also submit, cancel, upload"
        MANAGE = "manage", "manage: also quotas and team settings"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.CASCADE, related_name="service_tokens")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    name = models.CharField(max_length=80, validators=[shown_as_is])
    prefix = models.CharField(max_length=12)
    digest = models.CharField(max_length=64, unique=True)
    # Tokens made before scopes existed could do everything: they keep the full scope.
    scope = models.CharField(max_length=8, choices=Scope.choices, default=Scope.MANAGE)
    expires_at = models.DateTimeField(null=True, blank=True)  # None: never
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    last_used_ip = models.GenericIPAddressField(null=True, blank=True)

    @staticmethod
    def hash(raw: str) -> str:
        return hashlib.sha256(raw.encode()).hexdigest()


class RevokedToken(models.Model):
    """The digest of a deleted API token (revoked on the Tokens page, deleted in the
    admin, or gone with its user), never the token: a client still sending it is told
    it was revoked, not that it was never issued."""

    digest = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=12)
    revoked_at = models.DateTimeField(default=timezone.now)


class SsoIdentity(models.Model):
    """The OpenID Connect identity a user signs in with: the provider (issuer) and its
    stable subject id. A user found by these, never by e-mail (an address can change
    hands or be unverified)."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="sso_identities")
    issuer = models.CharField(max_length=255)
    subject = models.CharField(max_length=255)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["issuer", "subject"], name="uniq_sso_identity")]


@receiver(post_delete, sender=ApiToken, dispatch_uid="api_token_revoked")
def _token_deleted(sender, instance: ApiToken, **kwargs) -> None:
    RevokedToken.objects.bulk_create([RevokedToken(digest=instance.digest, prefix=instance.prefix)],
                                     ignore_conflicts=True)


class Host(models.Model):
    class State(models.TextChoices):
        ONLINE = "online", "Online"
        DRAINING = "draining", "Draining"
        OFFLINE = "offline", "Offline"

    name = models.CharField(max_length=120, unique=True)
    instance_type = models.CharField(max_length=40, blank=True)
    family = models.CharField(max_length=8, choices=Family.choices, default=Family.CPU)
    device_count = models.PositiveIntegerField(default=0)
    core_ids = models.JSONField(default=list)  # NeuronCore ids (CPU hosts: job slots)
    device_memory_bytes = models.BigIntegerField(default=0)
    memory_bytes = models.BigIntegerField(default=0)
    # A registry name ("cpu", "neuron") or a dotted "module:Class" path (out-of-tree
    # backends; the fault tests point a host at tests.fake_backends).
    backend = models.CharField(max_length=120, default="cpu")
    inventory = models.JSONField(default=dict)  # the parsed neuron-ls output
    state = models.CharField(max_length=10, choices=State.choices, default=State.ONLINE, db_index=True)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    registered_at = models.DateTimeField(default=timezone.now)
    replay = models.BooleanField(default=False)  # metrics come from a recorded file
    # A placement-group / EFA-domain label: a gang that asks to stay together is placed
    # on hosts of one label. "" = none.
    network = models.CharField(max_length=64, blank=True)
    # Where the other hosts of a gang reach this one (torchrun's rendezvous); "" = its name.
    address = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def queue(self) -> str:
        return f"host.{self.name}"

    @property
    def core_count(self) -> int:
        return len(self.core_ids)

    @property
    def reach(self) -> str:
        """The address other hosts use for this one."""
        return self.address or self.name


class ModelAsset(models.Model):
    """A registered model version: uploaded, fine-tuned or compiled. Lineage through parent."""

    class Format(models.TextChoices):
        HF = "hf", "Hugging Face folder"
        TORCHSCRIPT = "torchscript", "TorchScript (compiled, cpu)"
        NEURON = "neuron", "Neuron compiled (TorchScript + NEFF)"

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="models")
    name = models.CharField(max_length=120)
    version = models.PositiveIntegerField(default=1)
    format = models.CharField(max_length=16, choices=Format.choices, default=Format.HF)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children")
    source_job = models.ForeignKey("Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    path = models.CharField(max_length=500)  # relative to STORAGE_ROOT
    digest = models.CharField(max_length=64, blank=True, db_index=True)
    size_bytes = models.BigIntegerField(default=0)
    meta = models.JSONField(default=dict)  # compile shapes/target/options, architecture, ...
    compile_key = models.CharField(max_length=64, blank=True, db_index=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    # compile cache bookkeeping (jobs.compile_cache): pinned entries are never evicted;
    # hits and last_used_at order the least-recently-used eviction.
    pinned = models.BooleanField(default=False)
    hits = models.PositiveIntegerField(default=0)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name", "-version"]
        constraints = [models.UniqueConstraint(fields=["team", "name", "version"], name="uniq_model_version")]
        indexes = [
            # the pre-submit answer's "cached configurations of this model", newest first,
            # without sorting all of a model's entries (bench/compile_cache.py: 10,000 of them)
            models.Index(fields=["parent", "-id"], name="model_cache_by_parent", condition=~Q(compile_key="")),
        ]

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"

    @property
    def is_compiled(self) -> bool:
        return self.format != self.Format.HF

    @property
    def generates_text(self) -> bool:
        """A causal language model (what fine-tunes train and endpoints serve): not a
        diffusers pipeline, nor an artifact compiled for another task."""
        meta = self.meta or {}
        return not meta.get("diffusers") and meta.get("task", "text-generation") == "text-generation"


class CompileClaim(models.Model):
    """One compile per configuration at a time, fleet-wide: the row is the lock. The
    worker that inserts it (or takes it over from a holder that is no longer active,
    by a conditional UPDATE) compiles; the others wait and become cache hits."""

    key = models.CharField(max_length=80, unique=True)  # "<team id>:<compile key>"
    job = models.ForeignKey("Job", on_delete=models.CASCADE, related_name="+")
    claimed_at = models.DateTimeField(default=timezone.now)


class Dataset(models.Model):
    class Format(models.TextChoices):
        JSONL = "jsonl", "JSONL"
        CSV = "csv", "CSV"

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=120, validators=[shown_as_is])
    format = models.CharField(max_length=8, choices=Format.choices)
    path = models.CharField(max_length=500)
    rows = models.PositiveIntegerField(default=0)
    size_bytes = models.BigIntegerField(default=0)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name


class Job(models.Model):
    """A unit of work. Status changes only through jobs.states."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"
        SUSPENDED = "suspended", "Suspended"  # by its user: holds no cores until resumed

    # no index of its own: job_team_recent / job_team_status / job_team_finished lead with team_id
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="jobs", db_index=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="jobs")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    spec = models.JSONField(default=dict)
    family = models.CharField(max_length=8, choices=Family.choices, default=Family.CPU)
    cores = models.PositiveIntegerField(default=1)  # in all: a gang's cores over all its hosts
    # >1: a gang of that many whole hosts of `family`, started all together or not at all
    # (GangMember rows, rank 0 is `host`); each host gives cores // host_count cores.
    host_count = models.PositiveIntegerField(default=1)
    same_network = models.BooleanField(default=False)  # a gang placed inside one Host.network label
    model = models.ForeignKey(ModelAsset, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    dataset = models.ForeignKey(Dataset, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    output_model = models.ForeignKey(ModelAsset, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    max_runtime_s = models.PositiveIntegerField(default=24 * 3600)
    max_attempts = models.PositiveIntegerField(default=3)
    attempts = models.PositiveIntegerField(default=0)

    # placement (set when queued, cleared when requeued)
    # no index of its own: job_host_status leads with host_id
    host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs",
                             db_index=False)
    core_start = models.IntegerField(null=True, blank=True)

    created_at = models.DateTimeField(default=timezone.now)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker_pid = models.IntegerField(null=True, blank=True)
    cancel_requested = models.BooleanField(default=False)

    reason_code = models.CharField(max_length=40, blank=True)  # why pending / why failed
    reason = models.TextField(blank=True)
    failure = models.CharField(max_length=40, blank=True)  # error, timed_out, worker_lost, crashed, ...
    result = models.JSONField(default=dict, blank=True)
    cache_hit = models.BooleanField(default=False)
    log_bytes = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["team", "-id"], name="job_team_recent"),
            models.Index(fields=["team", "status"], name="job_team_status"),
            # quota pages: pending / queued / running per team, without scanning finished jobs
            models.Index(fields=["team", "status"], name="job_team_active",
                         condition=Q(status__in=["pending", "queued", "running"])),
            # dispatch reads the pending jobs in id order (jobs.lifecycle.scheduler.pending_rows)
            models.Index(fields=["id"], name="job_pending", condition=Q(status="pending")),
            models.Index(fields=["host", "status"], name="job_host_status"),
            # usage roll-up and live usage: jobs finished since the watermark
            models.Index(fields=["finished_at"], name="job_finished"),
            models.Index(fields=["team", "finished_at"], name="job_team_finished"),
        ]

    def __str__(self) -> str:
        return f"job {self.pk} ({self.kind}, {self.status})"

    ACTIVE = (Status.QUEUED, Status.RUNNING)
    FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED

    @property
    def core_range(self) -> str | None:
        """NEURON_RT_VISIBLE_CORES form: "4" or "4-7"."""
        if self.core_start is None:
            return None
        end = self.core_start + self.cores - 1
        return str(self.core_start) if end == self.core_start else f"{self.core_start}-{end}"

    @property
    def core_list(self) -> list[int]:
        if self.core_start is None:
            return []
        return list(range(self.core_start, self.core_start + self.cores))


# --- inference endpoints (jobs/endpoints): a team's model served by long-running
# replicas, each a Job of kind "serve" placed by the same scheduler, behind one stable
# URL (the gateway routes to the ready replicas of the serving revision).

class Endpoint(models.Model):
    """An endpoint's wanted state. Changed only through jobs.endpoints.services; the
    reconciler (jobs.endpoints.reconcile) makes the replicas follow it."""

    class State(models.TextChoices):
        ACTIVE = "active", "Active"
        DELETING = "deleting", "Deleting"  # replicas draining; becomes deleted once all stopped
        DELETED = "deleted", "Deleted"  # kept for the usage history of its replicas

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="endpoints")
    name = models.SlugField(max_length=63)  # unique among the team's active endpoints; in the URL
    model = models.ForeignKey(ModelAsset, null=True, on_delete=models.SET_NULL, related_name="endpoints")
    family = models.CharField(max_length=8, choices=Family.choices, default=Family.CPU)
    cores_per_replica = models.PositiveIntegerField(default=1)
    min_replicas = models.PositiveIntegerField(default=1)  # 0: scales to zero when idle
    max_replicas = models.PositiveIntegerField(default=1)
    desired_replicas = models.PositiveIntegerField(default=1)  # the autoscaler's target, min..max
    # {max_batch_size, max_seq_len, max_concurrent}: validated by jobs.endpoints.forms
    options = models.JSONField(default=dict)
    revision = models.PositiveIntegerField(default=1)  # the newest revision (bumped by a model/options change)
    serving_revision = models.PositiveIntegerField(default=0)  # the revision traffic goes to; 0 = none ready yet
    state = models.CharField(max_length=10, choices=State.choices, default=State.ACTIVE)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    scaled_at = models.DateTimeField(null=True, blank=True)  # the last autoscaler change (its cool-down)

    class Meta:
        ordering = ["team", "name"]
        # A name is taken by the team's active endpoint only: one being deleted frees it at once.
        constraints = [models.UniqueConstraint(fields=["team", "name"], name="uniq_active_endpoint_name",
                                               condition=Q(state="active"))]

    def __str__(self) -> str:
        return f"{self.team_id}/{self.name}"


class EndpointRevision(models.Model):
    """What one revision serves. A rollout starts replicas of the new revision and
    switches Endpoint.serving_revision to it once they are healthy; if they are not
    healthy by `deadline_at`, it rolls back to the revision before."""

    class State(models.TextChoices):
        ROLLING_OUT = "rolling_out", "Rolling out"
        LIVE = "live", "Live"
        SUPERSEDED = "superseded", "Superseded"
        ROLLED_BACK = "rolled_back", "Rolled back"
        STOPPED = "stopped", "Stopped (endpoint deleted)"

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="revisions")
    number = models.PositiveIntegerField()
    model = models.ForeignKey(ModelAsset, null=True, on_delete=models.SET_NULL, related_name="+")
    options = models.JSONField(default=dict)
    cores_per_replica = models.PositiveIntegerField(default=1)
    state = models.CharField(max_length=12, choices=State.choices, default=State.ROLLING_OUT)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    deadline_at = models.DateTimeField(null=True, blank=True)  # healthy by then, or roll back
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["endpoint", "-number"]
        constraints = [models.UniqueConstraint(fields=["endpoint", "number"], name="uniq_endpoint_revision")]


class Replica(models.Model):
    """One model server of an endpoint: its Job (kind serve) is placed, run and
    accounted like any job. The worker running it writes `url` and ready; the
    gateway sends requests only to ready replicas of the serving revision."""

    class State(models.TextChoices):
        STARTING = "starting", "Starting"  # its job waits for cores, or the server is loading
        READY = "ready", "Ready"  # answered its health check; takes traffic
        DRAINING = "draining", "Draining"  # takes no new requests; in-flight ones finish, then it stops
        STOPPED = "stopped", "Stopped"
        FAILED = "failed", "Failed"

    ACTIVE = (State.STARTING, State.READY, State.DRAINING)

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="replicas")
    job = models.OneToOneField(Job, on_delete=models.CASCADE, related_name="replica")
    revision = models.PositiveIntegerField()
    state = models.CharField(max_length=10, choices=State.choices, default=State.STARTING)
    url = models.CharField(max_length=255, blank=True)  # http://host:port of its server, "" until ready
    created_at = models.DateTimeField(default=timezone.now)
    ready_at = models.DateTimeField(null=True, blank=True)
    draining_at = models.DateTimeField(null=True, blank=True)
    stopped_at = models.DateTimeField(null=True, blank=True)
    detail = models.TextField(blank=True)  # why it failed or was stopped

    class Meta:
        ordering = ["endpoint", "id"]
        indexes = [models.Index(fields=["endpoint", "state"], name="replica_endpoint_state")]


class EndpointEvent(models.Model):
    """The endpoint's timeline: created, changed, scaled, rollout steps, replica
    crashes and replacements, deleted."""

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(default=timezone.now)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="+")
    kind = models.CharField(max_length=40)  # created, changed, scaled, rollout_started, traffic_shifted, ...
    revision = models.PositiveIntegerField(null=True, blank=True)
    message = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["endpoint", "-at"], name="endpoint_event_recent")]


class GangMember(models.Model):
    """One host of a multi-host job (Job.host_count > 1): its rank and that rank's run.
    Written with the job's placement and cleared with it; rank 0 is Job.host."""

    class State(models.TextChoices):
        PLACED = "placed", "Placed"
        RUNNING = "running", "Running"
        EXITED = "exited", "Exited"  # its process ended with exit code 0
        FAILED = "failed", "Failed"  # its process failed or its worker was lost

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="gang")
    rank = models.PositiveIntegerField()
    host = models.ForeignKey(Host, null=True, on_delete=models.SET_NULL, related_name="+")
    core_start = models.IntegerField(default=0)
    cores = models.PositiveIntegerField()
    state = models.CharField(max_length=8, choices=State.choices, default=State.PLACED)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    worker_pid = models.IntegerField(null=True, blank=True)
    exit_code = models.IntegerField(null=True, blank=True)
    detail = models.TextField(blank=True)  # why it failed

    class Meta:
        ordering = ["job", "rank"]
        constraints = [models.UniqueConstraint(fields=["job", "rank"], name="uniq_gang_rank")]

    @property
    def core_range(self) -> str:
        end = self.core_start + self.cores - 1
        return str(self.core_start) if end == self.core_start else f"{self.core_start}-{end}"


class JobEvent(models.Model):
    """The job's timeline: every state change and notable fact, who and when."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(default=timezone.now)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    kind = models.CharField(max_length=40)  # status name, or "preempted", "cache_hit", "requeued", ...
    message = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["at", "id"]


class CoreAllocation(models.Model):
    """One row per NeuronCore held by a job. The unique (host, core) constraint is
    what makes it impossible for two jobs to hold the same core, whatever races."""

    # host and team: no index of their own; one_job_per_core leads with host_id, alloc_team_family with team_id
    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="allocations", db_index=False)
    core = models.IntegerField()
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="allocations")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+", db_index=False)
    family = models.CharField(max_length=8, choices=Family.choices)
    borrowed = models.BooleanField(default=False)  # beyond the team's guarantee: may be preempted
    since = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["host", "core"], name="one_job_per_core")]
        indexes = [models.Index(fields=["team", "family"], name="alloc_team_family")]


class JobAttempt(models.Model):
    """One allocation interval of a job (cores × time). Usage is derived from these;
    a preempted or requeued attempt counts for the time it held its cores."""

    # job and team: no index of their own; uniq_attempt leads with job_id, attempt_team_start / _ended with team_id
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="attempt_rows", db_index=False)
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+", db_index=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    family = models.CharField(max_length=8, choices=Family.choices)
    instance_type = models.CharField(max_length=40, blank=True)
    host = models.ForeignKey(Host, null=True, on_delete=models.SET_NULL, related_name="+")
    number = models.PositiveIntegerField()
    cores = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)  # null = still holding cores
    core_seconds = models.FloatField(default=0)  # set when the attempt ends
    outcome = models.CharField(max_length=20, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "number"], name="uniq_attempt")]
        indexes = [
            models.Index(fields=["team", "started_at"], name="attempt_team_start"),
            # usage roll-up and live usage: open attempts (ended_at IS NULL) and recent ends
            models.Index(fields=["ended_at"], name="attempt_ended"),
            models.Index(fields=["team", "ended_at"], name="attempt_team_ended"),
        ]


class JobLogChunk(models.Model):
    """The job log, kept in the database so it outlives the host that wrote it."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="log_chunks",
                            db_index=False)  # uniq_log_chunk leads with job_id
    offset = models.BigIntegerField()  # byte offset of this chunk in the whole log
    text = models.TextField()

    class Meta:
        ordering = ["offset"]
        constraints = [models.UniqueConstraint(fields=["job", "offset"], name="uniq_log_chunk")]


class JobMetric(models.Model):
    """Structured progress from the job itself (loss per step, ...)."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="metrics")
    step = models.IntegerField()
    name = models.CharField(max_length=40)
    value = models.FloatField()

    class Meta:
        indexes = [models.Index(fields=["job", "name", "step"], name="metric_job_name_step")]


class Artifact(models.Model):
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="artifacts")
    name = models.CharField(max_length=300)  # relative path under the job's artifacts dir
    path = models.CharField(max_length=500)  # relative to STORAGE_ROOT
    size_bytes = models.BigIntegerField(default=0)
    is_dir = models.BooleanField(default=False)

    class Meta:
        ordering = ["name"]


class MetricMinute(models.Model):
    """Per-minute roll-up of live utilization, per job core (or per host core when
    job is null), kept after the Redis stream has moved on."""

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="+")
    job = models.ForeignKey(Job, null=True, blank=True, on_delete=models.CASCADE, related_name="metric_minutes")
    minute = models.DateTimeField()
    core = models.IntegerField(default=-1)  # -1 = host-level (vCPU / memory)
    util_mean = models.FloatField(default=0)
    util_peak = models.FloatField(default=0)
    mem_bytes = models.BigIntegerField(default=0)
    lat_p50 = models.FloatField(null=True, blank=True)
    lat_p99 = models.FloatField(null=True, blank=True)
    errors = models.IntegerField(default=0)
    samples = models.IntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["host", "job", "minute", "core"], name="uniq_metric_minute"),
            # NULLs are distinct in the constraint above, so host rows (job null) need their own.
            models.UniqueConstraint(fields=["host", "minute", "core"], condition=Q(job__isnull=True),
                                    name="uniq_host_metric_minute"),
        ]
        indexes = [models.Index(fields=["job", "minute"], name="mm_job_minute")]


class UsageTotals(models.Model):
    """The additive measures every usage roll-up row carries (see jobs.usage.Totals,
    which mirrors these fields; the two must stay in step).

    Allocated core-seconds split three ways: `used` (the measured part × its
    measured utilization), idle (measured − used) and unknown (core_seconds −
    measured: no utilization sample covered it). Cost is priced when folded, with
    the price in effect then, like a bill."""

    core_seconds = models.FloatField(default=0)  # allocated NeuronCores × seconds
    measured_core_seconds = models.FloatField(default=0)  # allocated core-seconds with a utilization measurement
    used_core_seconds = models.FloatField(default=0)  # measured core-seconds × measured utilization
    cost_usd = models.FloatField(default=0)
    idle_cost_usd = models.FloatField(default=0)  # (measured − used) core-seconds × price
    unpriced_core_seconds = models.FloatField(default=0)  # on instance types without a price
    jobs_succeeded = models.IntegerField(default=0)  # counted on the day the job finished
    jobs_failed = models.IntegerField(default=0)
    jobs_cancelled = models.IntegerField(default=0)
    attempts_interrupted = models.IntegerField(default=0)  # preempted or requeued attempts
    wait_count = models.IntegerField(default=0)  # queue waits, counted on the day of the first start
    wait_sum_s = models.FloatField(default=0)
    wait_sketch = models.JSONField(default=dict, blank=True)  # {bucket: count}, see jobs.usage.WaitSketch

    class Meta:
        abstract = True


class UsageDaily(UsageTotals):
    """Usage per team / day (in the team's time zone) / user / kind / family /
    instance type, folded incrementally by jobs.usage_rollup."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+")
    day = models.DateField()
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    family = models.CharField(max_length=8, choices=Family.choices)
    instance_type = models.CharField(max_length=40, blank=True)

    class Meta:
        # A deleted user's rows get user NULL and may then share a key; that is
        # harmless (pages sum rows) and keeps this constraint portable to SQLite.
        constraints = [models.UniqueConstraint(fields=["team", "day", "user", "kind", "family", "instance_type"],
                                               name="uniq_usage_daily_key")]
        indexes = [models.Index(fields=["team", "day"], name="usage_team_day")]


class UsageTeamDay(UsageTotals):
    """Per team and (team-local) day: the site page's team table without reading
    every UsageDaily row of every team."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+")
    day = models.DateField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "day"], name="uniq_usage_team_day")]
        indexes = [models.Index(fields=["day"], name="usage_teamday_day")]


class UsageSiteDaily(UsageTotals):
    """All teams summed per day (each team's own local day) / kind / family: the
    site page's charts in a few hundred rows per quarter (cost is already priced
    per instance type in the rows it is folded from, so that split is not kept)."""

    day = models.DateField()
    kind = models.CharField(max_length=16, choices=Kind.choices)
    family = models.CharField(max_length=8, choices=Family.choices)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["day", "kind", "family"], name="uniq_usage_site_day_kind")]


class UsageSiteWaitTotal(models.Model):
    """Running totals of the site's queue-wait sketches per kind: the row (day, kind)
    holds every wait of that kind counted on days up to and including `day`, so
    the waits of any range are the difference of two rows (bucket counts are
    integers: exact), not a merge of every UsageSiteDaily sketch in it. A row
    exists for each day with waits; days between take the row before them.
    Maintained by jobs.usage_rollup.fold (rebuild_site_wait_totals rebuilds it
    from UsageSiteDaily)."""

    day = models.DateField()
    kind = models.CharField(max_length=16, choices=Kind.choices)
    wait_count = models.BigIntegerField(default=0)
    wait_sketch = models.JSONField(default=dict, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["kind", "day"], name="uniq_usage_wait_total")]


class JobUsage(models.Model):
    """One job's folded usage (for "top jobs by cost") and the roll-up's progress on
    it: attempts numbered <= attempt_folded are fully folded; attempt
    attempt_folded + 1 is folded up to folded_until (null = not at all);
    outcome_folded says its finish was counted."""

    job = models.OneToOneField(Job, primary_key=True, on_delete=models.CASCADE, related_name="usage")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+")
    day = models.DateField()  # team-local day of the job's latest folded activity
    instance_type = models.CharField(max_length=40, blank=True)  # of the latest folded attempt
    core_seconds = models.FloatField(default=0)
    measured_core_seconds = models.FloatField(default=0)
    used_core_seconds = models.FloatField(default=0)
    cost_usd = models.FloatField(default=0)
    idle_cost_usd = models.FloatField(default=0)
    attempt_folded = models.PositiveIntegerField(default=0)
    folded_until = models.DateTimeField(null=True, blank=True)
    outcome_folded = models.BooleanField(default=False)

    class Meta:
        # "top jobs by cost": a team's page walks its own jobs by cost (or its range
        # by day, for a short range of a big team); the site walks everyone's by cost.
        indexes = [models.Index(fields=["team", "day"], name="jobusage_team_day"),
                   models.Index(fields=["team", "-cost_usd"], name="jobusage_team_cost"),
                   models.Index(models.F("cost_usd").desc(), name="jobusage_cost")]


class UsageRollupState(models.Model):
    """The roll-up's watermark (a single row): everything that ended at or before
    `cutoff` has been folded; pages compute the rest live."""

    cutoff = models.DateTimeField(null=True, blank=True)
    ran_at = models.DateTimeField(null=True, blank=True)
    folded_pieces = models.BigIntegerField(default=0)  # attempt pieces folded, ever (for monitoring)
    # The cache stamps of the pages' roll-up reads (jobs.usage.selectors.Stamp): a new
    # random value with every fold, and with every fold that writes a "settled" day
    # (one at least two days before its cutoff's UTC date: normally only recent days
    # change), so pages may cache reads of settled days across folds
    # (jobs.usage.rollup.settled_day). Random, so no two databases share one.
    stamp = models.CharField(max_length=32, blank=True)
    settled_stamp = models.CharField(max_length=32, blank=True)


class InstancePrice(models.Model):
    instance_type = models.CharField(max_length=40, unique=True)
    usd_per_hour = models.FloatField()
    cores = models.PositiveIntegerField()

    @property
    def usd_per_core_hour(self) -> float:
        return self.usd_per_hour / max(self.cores, 1)


class KindPriority(models.Model):
    """Admin-adjustable scheduling priority per job kind (higher goes first)."""

    kind = models.CharField(max_length=16, choices=Kind.choices, unique=True)
    priority = models.IntegerField()

    class Meta:
        verbose_name_plural = "kind priorities"


# --- notifications: subscriptions, the outbox (a Notification and its Delivery rows,
# written in the same transaction as the state change they report), and the team
# policies that raise notifications (idle cores, budgets); see jobs/notify.

class EventKind(models.TextChoices):
    JOB_SUCCEEDED = "job.succeeded", "Job succeeded"
    JOB_FAILED = "job.failed", "Job failed"
    JOB_TIMED_OUT = "job.timed_out", "Job timed out"
    JOB_PREEMPTED = "job.preempted", "Job preempted"
    JOB_REQUEUED = "job.requeued", "Job requeued"
    JOB_WAITING = "job.waiting", "Job waiting longer than the threshold"
    JOB_IDLE = "job.idle", "Job's cores idle"
    JOB_IDLE_STOPPED = "job.idle_stopped", "Job stopped for idle cores"
    ENDPOINT_UNHEALTHY = "endpoint.unhealthy", "Endpoint unhealthy"
    BUDGET_THRESHOLD = "budget.threshold", "Budget threshold reached"
    BUDGET_FORECAST = "budget.forecast", "Budget forecast to run out this month"
    QUOTA_CHANGED = "quota.changed", "Quota changed"


# Events about one job go to its owner's "self" subscriptions; every event goes to the
# team's "team" subscriptions (managers only may create those).
JOB_EVENTS = frozenset({EventKind.JOB_SUCCEEDED, EventKind.JOB_FAILED, EventKind.JOB_TIMED_OUT,
                        EventKind.JOB_PREEMPTED, EventKind.JOB_REQUEUED, EventKind.JOB_WAITING,
                        EventKind.JOB_IDLE, EventKind.JOB_IDLE_STOPPED})


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


class Subscription(models.Model):
    class Scope(models.TextChoices):
        SELF = "self", "My jobs"
        TEAM = "team", "The whole team"

    class Channel(models.TextChoices):
        EMAIL = "email", "Email"
        SLACK = "slack", "Slack incoming webhook"
        WEBHOOK = "webhook", "Signed webhook"

    team = models.ForeignKey("jobs.Team", on_delete=models.CASCADE, related_name="subscriptions")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="subscriptions")
    scope = models.CharField(max_length=8, choices=Scope.choices, default=Scope.SELF)
    events = models.JSONField(default=list)  # EventKind values
    channel = models.CharField(max_length=8, choices=Channel.choices)
    target = models.CharField(max_length=500)  # an email address or an https URL
    secret = models.CharField(max_length=80, default=new_secret)  # HMAC key of signed webhooks
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    # The last delivery that was given up: shown to the subscriber until one succeeds.
    failing_since = models.DateTimeField(null=True, blank=True)
    last_failure = models.TextField(blank=True)

    class Meta:
        indexes = [models.Index(fields=["team", "active"], name="sub_team_active")]

    def __str__(self) -> str:
        return f"{self.channel} {self.target} ({self.scope} of {self.team_id})"


class Notification(models.Model):
    """One event (the outbox entry). `dedup_key` makes "fires once" facts (a budget
    threshold per month, a job's idle flag) race-free: a second insert fails."""

    team = models.ForeignKey("jobs.Team", on_delete=models.CASCADE, related_name="+")
    job = models.ForeignKey("jobs.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="+")  # whose job / whom it concerns ("self" subscribers)
    kind = models.CharField(max_length=40, choices=EventKind.choices)
    title = models.CharField(max_length=300)
    payload = models.JSONField(default=dict)
    dedup_key = models.CharField(max_length=200, null=True, blank=True, unique=True)
    created_at = models.DateTimeField(default=timezone.now)


class Delivery(models.Model):
    """One notification to one subscription. `delivery_id` is sent with every attempt
    (receivers de-duplicate on it). `ticket` is bumped by every claim: a send is
    recorded only by the claim that made it, so a stale Celery message or a worker
    that died mid-send cannot record over a newer attempt."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Gave up"

    notification = models.ForeignKey(Notification, on_delete=models.CASCADE, related_name="deliveries")
    subscription = models.ForeignKey(Subscription, on_delete=models.CASCADE, related_name="deliveries")
    delivery_id = models.UUIDField(default=uuid.uuid4, unique=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    ticket = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["next_attempt_at"], name="delivery_due", condition=Q(status="pending")),
            models.Index(fields=["subscription", "-id"], name="delivery_sub_recent"),
        ]


class TeamAlertPolicy(models.Model):
    """Per team: what idle cores lead to, and budget alerting switches."""

    class IdleAction(models.TextChoices):
        NOTIFY = "notify", "Flag and notify only"
        STOP = "stop", "Stop the job after the grace period"

    team = models.OneToOneField("jobs.Team", on_delete=models.CASCADE, related_name="alert_policy")
    idle_util_below = models.FloatField(default=0.05)  # fraction 0..1 of a core
    idle_minutes = models.PositiveIntegerField(default=30)
    idle_action = models.CharField(max_length=8, choices=IdleAction.choices, default=IdleAction.NOTIFY)
    idle_grace_minutes = models.PositiveIntegerField(default=15)
    budget_thresholds = models.JSONField(default=list)  # percents; empty = the site's (50, 80, 100)


class UserBudget(models.Model):
    """An optional hard cap on one user's NeuronCore-hours per month in a team."""

    team = models.ForeignKey("jobs.Team", on_delete=models.CASCADE, related_name="user_budgets")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    monthly_core_hours = models.FloatField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "user"], name="uniq_user_budget")]
