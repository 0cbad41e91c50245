"""Short-lived live data in Redis (bounded): log tails and metric streams.
Nothing here is the only copy of anything that matters."""
from __future__ import annotations

import functools

import redis as redis_lib
from django.conf import settings


@functools.lru_cache(maxsize=1)
def redis() -> redis_lib.Redis:
    return redis_lib.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=2,
                                    health_check_interval=30)
