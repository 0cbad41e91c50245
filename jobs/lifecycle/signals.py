"""What the lifecycle tells the areas built on it, which it must not import (they
import it): each signal names who listens."""
from __future__ import annotations

from django.dispatch import Signal

# The scheduler preempts a running job that drains before its cores go (an endpoint
# replica). Sent inside the dispatch transaction with job_id, message, by_job (the
# job that gets the cores) and by_team (its team's slug). A receiver that takes the
# job out of service and stops it returns True; with none, the scheduler stops it at
# once. Either way the job keeps its cores until its process has ended.
# Listener: jobs.endpoints.replicas.replica_preempted.
drain_requested = Signal()
