"""The host-side process layer: run each job in a process of its own and supervise it.

Django-free. The worker calls :func:`supervise`, which launches the job's runner
in a new session and process group, follows its log and metrics, heartbeats,
stops it on cancel or time limit (SIGTERM, grace, SIGKILL of the group) and
returns an :class:`Outcome`.

Modules, one job each:

``supervise``      the supervision loop: heartbeats, cancel, time limit, outcome
``launch``         start a job process (fork via the zygote, or exec) in a new session
``handles``        a launched job process: wait for it, learn its exit status
``outcome``        how a job ended, from its exit status and result.json
``workdir``        the files a supervisor and its job share
``tailing``        following log.txt and metrics.jsonl
``groups``         process groups and sessions from /proc; stopping a group
``sessions``       the recorded session of every job launched on this host
``zygote``         the supervising process's preloaded fork server (client side)
``zygote_server``  the zygote process itself
``zygote_warmup``  the cpu warm-up the zygote runs before forking
``child``          a process forked by the zygote: runs its job(s)
``warm``           warm runners: a finished cpu inference process serves the next
``channel``        the status channel of a fork-mode job
``lifeline``       the job's side of its lifeline: stop when the supervisor is gone
``runner``         inside the job process: run the backend, write the verdict

Why not a library: ``multiprocessing`` refuses to start children from daemonic
processes (Celery's prefork pool) and offers no session, lifeline or exit-status
forwarding for a process it did not fork itself; supervisord manages
long-running daemons, not one short process per job.
"""
from neuron_workers.process.groups import group_alive, group_members, kill_process_group, session_members
from neuron_workers.process.handles import ChildHandle, Mode
from neuron_workers.process.launch import INLINE_PAYLOAD_MAX, child_env, launch
from neuron_workers.process.outcome import Outcome
from neuron_workers.process.sessions import find_orphans, kill_orphans
from neuron_workers.process.supervise import supervise
from neuron_workers.process.zygote import DEFAULT_PRELOAD, Zygote, ZygoteError, default_zygote, prewarm

__all__ = [
    "DEFAULT_PRELOAD", "INLINE_PAYLOAD_MAX", "ChildHandle", "Mode", "Outcome", "Zygote", "ZygoteError", "child_env",
    "default_zygote", "find_orphans", "group_alive", "group_members", "kill_orphans", "kill_process_group", "launch",
    "prewarm", "session_members", "supervise",
]
