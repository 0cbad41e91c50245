"""A team's fair-share standing and what holds its jobs back, in numbers, for any
member (the team page): every team's share, decayed usage and their ratio, which
is the order fair_order serves teams in; the team's pending jobs by waiting reason
with the cores they ask for."""
from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Count, Sum

from jobs.models import Job, Team
from jobs.quotas.selectors import decayed_usage_by_team, half_life_s, team_shares


@dataclass(frozen=True)
class Standing:
    rank: int  # 1 = served first among teams with the same kind priority
    teams: int
    share: float
    decayed_core_hours: float
    ratio: float  # decayed core-hours per unit of share: lower goes first
    order: list[dict]  # every team: slug, share, decayed core-hours, ratio, mine
    held_back: list[dict]  # this team's pending jobs: reason code, jobs, cores
    half_life_days: float


def standing(team: Team) -> Standing:
    shares = team_shares()
    usage = decayed_usage_by_team()
    slugs = dict(Team.objects.values_list("pk", "slug"))
    rows = []
    for team_id, slug in slugs.items():
        share = shares.get(team_id) or 1.0
        hours = usage.get(team_id, 0.0) / 3600
        rows.append({"slug": slug, "share": share, "decayed_core_hours": round(hours, 2),
                     "ratio": round(hours / share, 3), "mine": team_id == team.pk})
    rows.sort(key=lambda r: (r["ratio"], r["slug"]))
    mine = next(i for i, r in enumerate(rows, 1) if r["mine"])
    held = (Job.objects.filter(team=team, status=Job.Status.PENDING).values("reason_code")
            .annotate(jobs=Count("id"), cores=Sum("cores")).order_by("-jobs"))
    me = rows[mine - 1]
    return Standing(mine, len(rows), me["share"], me["decayed_core_hours"], me["ratio"], rows,
                    [dict(r) for r in held], round(half_life_s() / 86400, 2))
