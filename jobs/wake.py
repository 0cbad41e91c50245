"""Waking the scheduler after something changed that may let pending jobs start (a
submit, a finished job, a raised quota). The dispatch task is sent by name, so any
area can wake the scheduler without importing it."""
from __future__ import annotations

import logging

from jobs.live import store
from webapp.celery import app

log = logging.getLogger(__name__)

# Set by a kick, cleared by the dispatch run it caused: a burst of kicks is one run.
KICK_FLAG = "nd:dispatch:kick"


def kick_pending() -> bool:
    """Is the kick flag set: a kick that no dispatch run has served yet, so a run
    starts after this moment? True if Redis cannot say."""
    try:
        return bool(store.redis().exists(KICK_FLAG))
    except Exception:
        return True


def kick_dispatch() -> None:
    """Wake the scheduler. Bursts of submissions coalesce into one dispatch run via a
    short-lived Redis flag; if Redis is down the periodic dispatch picks the job up."""
    try:
        if store.redis().set(KICK_FLAG, 1, nx=True, ex=5):
            app.send_task("jobs.dispatch", queue="scheduler")
    except Exception as exc:  # the job row is committed; losing the wake-up only delays it
        log.warning("could not wake the scheduler (%s); the periodic dispatch will place the job", exc)
