"""Changes to hosts made from the console: drain (no new jobs) and back online."""
from __future__ import annotations

import logging

from django.db import transaction

from jobs.models import AuditEntry, Host

log = logging.getLogger(__name__)


def host_set_state(*, host: Host, state: str, actor=None) -> None:
    """Set the host's state, audited (site-wide: subject host.<name>, old → new)."""
    with transaction.atomic():
        old = Host.objects.select_for_update().filter(pk=host.pk).values_list("state", flat=True).first()
        Host.objects.filter(pk=host.pk).update(state=state)
        if old is not None and old != state:
            AuditEntry.objects.create(team=None, actor=actor, subject=f"host.{host.name}"[:120], old=old, new=state)
    log.info("host %s set to %s by %s", host.name, state, actor)
