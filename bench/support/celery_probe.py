"""The baseline of bench/dispatch.py: a bare Celery task.

Loaded into the bench's host worker with `celery worker --include bench.support.celery_probe`,
so the probe travels the same broker, queue and worker pool as a job's run message,
and does the least a task can do to be observed: push its completion time onto a
Redis list the bench waits on.
"""
from __future__ import annotations

import functools
import os
import time

import redis

from webapp.celery import app


@functools.lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


@app.task(name="bench.probe", ignore_result=True)
def probe(key: str) -> None:
    """Record that the task ran: RPUSH key <unix time>."""
    _redis().rpush(key, repr(time.time()))
