"""Changes to hosts made from the console: drain (no new jobs) and back online."""
from __future__ import annotations

import logging

from jobs.models import Host

log = logging.getLogger(__name__)

def host_set_state(*, host: Host, state: str, actor=None) -> None:
    Host.objects.filter(pk=host.pk).update(state=state)
    log.info("host %s set to %s by %s", host.name, state, actor)
