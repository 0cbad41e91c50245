"""Usage pages: a team's (/teams/<slug>/usage/, members only) and the site's
(/usage/, staff only), each with CSV export of every table and chart
(`?format=csv&table=<name>`), and the admin-editable price table.

Views only translate HTTP: the range is parsed by jobs.usage.parse_range, numbers
come from jobs.selectors_usage, figures from jobs.charts_usage. Another team's
page, and the site page for non-staff, is a 404."""
from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Mapping
from urllib.parse import urlencode

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST, require_safe

from jobs import access, pages
from jobs.models import InstancePrice, Team
from jobs.usage import accounting, charts, selectors
from jobs.usage.selectors import Report, Table

RANGE_PARAMS = ("range", "from", "to")
TEAMS_SHOWN = 50  # the site page lists the top teams; the CSV and the API have them all
RANGE_CHOICES = [("7d", "7 days"), ("30d", "30 days"), ("90d", "90 days"), ("custom", "Custom")]


def _base_context(request: HttpRequest, team: Team | None, nav: str) -> dict:
    teams = access.nav_teams(request.user)
    return {"nav_teams": teams, "team": team or (teams[0] if teams else None), "nav": nav}


def _range_query(request: HttpRequest) -> dict[str, str]:
    return {k: request.GET[k] for k in RANGE_PARAMS if request.GET.get(k)}


def _group_by(request: HttpRequest, allowed: tuple[str, ...]) -> tuple[str, dict[str, list[str]]]:
    value = request.GET.get("group_by") or allowed[0]
    if value not in allowed:
        return allowed[0], {"group_by": [f"{value!r} is not a grouping; choose {', '.join(allowed)}."]}
    return value, {}


def _csv_response(tables: dict[str, Table], name: str, filename: str) -> HttpResponse:
    if name not in tables:
        choices = ", ".join(sorted(tables))
        return HttpResponse(f"table: {name!r} is not a table of this page; choose one of {choices}.\n",
                            status=400, content_type="text/plain; charset=utf-8")
    table = tables[name]
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}-{name}.csv"'
    writer = csv.writer(response)
    writer.writerow(table.columns)
    for row in table.rows:
        writer.writerow(["" if v is None else v for v in row])
    return response


def _column(table: Table, name: str) -> list:
    i = table.columns.index(name)
    return [row[i] for row in table.rows]


def _figures(report: Report, tables: dict[str, Table], group_by: str) -> dict[str, dict]:
    """Every chart of the page, drawn from the very tables the CSV exports."""
    hours = tables["hours"]
    series: dict[str, list[float]] = {}
    for day, label, value in zip(_column(hours, "day"), _column(hours, group_by), _column(hours, "core_hours")):
        series.setdefault(label, []).append(value)
    days = [d.isoformat() for d in report.days]
    alloc = tables["allocation"]
    burn, wait, outcomes = tables["burndown"], tables["wait"], tables["outcomes"]
    kind_rows = [r for r in outcomes.rows if r[0] != "all"]
    burn_state = report.burn
    figures = {
        "hours": charts.stacked_hours(days, series, by=group_by),
        "allocation": charts.allocated_vs_used(days, _column(alloc, "used_core_hours"),
                                                     _column(alloc, "idle_core_hours"),
                                                     _column(alloc, "unknown_core_hours"),
                                                     _column(alloc, "idle_cost_usd")),
        "cost": charts.cost_per_day(days, _column(alloc, "cost_usd"), _column(alloc, "idle_cost_usd")),
        "burndown": charts.burn_down(_column(burn, "day"), _column(burn, "cumulative_core_hours"),
                                           _column(burn, "forecast_core_hours"), burn_state.budget,
                                           burn_state.run_out_day.isoformat() if burn_state.run_out_day else None),
        "wait": charts.queue_wait(_column(wait, "kind"), _column(wait, "p50_s"), _column(wait, "p95_s"),
                                        _column(wait, "jobs")),
        "outcomes": charts.outcome_rates([r[0] for r in kind_rows], [r[1] for r in kind_rows],
                                               [r[2] for r in kind_rows], [r[3] for r in kind_rows]),
    }
    if "fleet" in tables:
        fleet = tables["fleet"]
        figures["fleet"] = charts.fleet_utilization(days, _column(fleet, "utilization_pct"),
                                                          _column(fleet, "allocated_share_pct"))
    return figures


def _render(request: HttpRequest, template: str, context: dict, *, report: Report | None, group_by: str,
            groups: tuple[str, ...], errors: dict[str, list[str]], filename: str) -> HttpResponse:
    """The page, its CSV, or the form with errors (400)."""
    query = _range_query(request)
    context = {**context, "query": query, "range_qs": urlencode(query), "groups": groups, "group_by": group_by,
               "range_choices": RANGE_CHOICES,
               "selected_range": query.get("range") or ("custom" if query.get("from") or query.get("to")
                                                        else accounting.DEFAULT_RANGE)}
    if errors or report is None:
        return render(request, template, {**context, "errors": errors, "report": None}, status=400)
    tables = selectors.tables(report)
    if request.GET.get("format") == "csv":
        return _csv_response(tables, request.GET.get("table", ""), filename)
    if request.GET.get("format"):
        return HttpResponse("format: only csv is offered.\n", status=400, content_type="text/plain; charset=utf-8")
    csv_base = {**query, "group_by": group_by, "format": "csv"}
    dicts = DisplayTables(tables)
    return render(request, template, {
        **context, "report": report, "errors": {}, "totals": report.totals, "burn": report.burn, "tables": dicts,
        "figures": {f"fig-{name}": fig for name, fig in _figures(report, tables, group_by).items()},
        "csv": {name: "?" + urlencode({**csv_base, "table": name}) for name in tables},
        "group_links": [(g, "?" + urlencode({**query, "group_by": g})) for g in groups],
        "teams_shown": _display_rows(tables["teams"], TEAMS_SHOWN) if "teams" in tables else [],
        "teams_total": len(tables["teams"].rows) if "teams" in tables else 0,
        "efficiency_rows": _efficiency_rows(tables["efficiency"]),
        "wait_rows": [{"kind": r["kind"], "jobs": r["jobs"], "p50": _duration(r["p50_s"]),
                       "p95": _duration(r["p95_s"]), "mean": _duration(r["mean_s"])} for r in tables["wait"].dicts()],
    })


class DisplayTables(Mapping):
    """The report's tables with cells formatted for people, each formatted when
    first read: the page lists a few of them (the charts take the raw tables), and
    formatting every table's every cell cost more than the page's queries."""

    def __init__(self, tables: dict[str, Table]):
        self._tables, self._done = tables, {}

    def __getitem__(self, name: str) -> list[dict]:
        if name not in self._done:
            self._done[name] = _display_rows(self._tables[name])
        return self._done[name]

    def __iter__(self):
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)


EFFICIENCY_SHOWN = 20  # rows per group (team, user) on the page; the CSV has them all


def _efficiency_rows(table: Table) -> list[dict]:
    """The efficiency table for the page: the largest EFFICIENCY_SHOWN teams or users
    (rows come largest first within each group), every kind."""
    seen: dict[str, int] = defaultdict(int)
    kept = Table(table.columns)
    for row in table.rows:
        seen[row[0]] += 1
        if seen[row[0]] <= EFFICIENCY_SHOWN:
            kept.rows.append(row)
    return _display_rows(kept)


def _display_rows(table: Table, limit: int | None = None) -> list[dict]:
    rows = table.rows if limit is None else table.rows[:limit]
    return [{c: _display(c, v) for c, v in zip(table.columns, row)} for row in rows]


def _display(column: str, value):
    """A table cell for people (the CSV keeps the raw number): formatted here once,
    because template filters over a 200-team table cost more than the queries."""
    if value is None:
        return "—"
    if column.endswith("_pct"):
        return f"{value:.1f} %"
    if column.endswith("_usd"):
        return f"${value:,.2f}"
    if column.endswith("core_hours"):
        return f"{value:,.2f}"
    return value


def _duration(seconds: float | None) -> str:
    """A wait for people: "—", "45 s", "12.5 min", "3.2 h"."""
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@login_required
@require_safe
def team_usage(request: HttpRequest, slug: str) -> HttpResponse:
    team = access.get_team(request.user, slug)
    today = accounting.local_day(timezone.now(), accounting.zone(team.time_zone))
    group_by, errors = _group_by(request, selectors.TEAM_GROUPS)
    report = None
    try:
        range_name, first, last = accounting.parse_range(request.GET, today)
    except accounting.RangeError as e:
        errors = {**errors, **e.errors}
    else:
        if not errors:
            report = selectors.team_report(team, range_name, first, last, group_by=group_by)
    context = {**_base_context(request, team, "usage"), "scope": "team", "today": today,
               "writable": pages.can_write(request.user, team)}
    return _render(request, "usage/team.html", context, report=report, group_by=group_by,
                   groups=selectors.TEAM_GROUPS, errors=errors, filename=f"usage-{team.slug}")


class PriceForm(forms.Form):
    """An admin's price for an instance type (e.g. a reserved-capacity rate)."""

    instance_type = forms.CharField(max_length=40)
    usd_per_hour = forms.FloatField(min_value=0.0, label="USD per hour")
    cores = forms.IntegerField(min_value=1, max_value=1024, label="NeuronCores")

    def clean_instance_type(self) -> str:
        value = self.cleaned_data["instance_type"].strip()
        if not value or " " in value:
            raise forms.ValidationError("Enter an instance type such as trn1.32xlarge.")
        return value


@login_required
@require_safe
def site_usage(request: HttpRequest) -> HttpResponse:
    pages.require_staff(request)
    return _site_page(request, PriceForm())


def _site_page(request: HttpRequest, price_form: PriceForm, *, status: int | None = None) -> HttpResponse:
    today = accounting.local_day(timezone.now(), accounting.zone(settings.TIME_ZONE))
    group_by, errors = _group_by(request, selectors.SITE_GROUPS)
    report = None
    try:
        range_name, first, last = accounting.parse_range(request.GET, today)
    except accounting.RangeError as e:
        errors = {**errors, **e.errors}
    overrides = list(InstancePrice.objects.order_by("instance_type"))
    if not errors:
        # the prices in effect are the defaults with these overrides (jobs.usage_rollup.prices)
        table = accounting.price_table((p.instance_type, p.usd_per_hour, p.cores) for p in overrides)
        report = selectors.site_report(range_name, first, last, group_by=group_by, price_table=table)
    context = {**_base_context(request, None, "site_usage"), "scope": "site", "today": today,
               "price_form": price_form, "overrides": overrides}
    response = _render(request, "usage/site.html", context, report=report, group_by=group_by,
                       groups=selectors.SITE_GROUPS, errors=errors, filename="usage-site")
    if status is not None and response.status_code == 200:
        response.status_code = status
    return response


@login_required
@require_POST
def price_set(request: HttpRequest) -> HttpResponse:
    """Create or change the price of an instance type. It applies to usage folded
    from now on; past days keep the price they were costed with."""
    pages.require_staff(request)
    form = PriceForm(request.POST)
    if not form.is_valid():
        return _site_page(request, form, status=400)
    data = form.cleaned_data
    InstancePrice.objects.update_or_create(instance_type=data["instance_type"],
                                           defaults={"usd_per_hour": data["usd_per_hour"], "cores": data["cores"]})
    messages.success(request, f"Price of {data['instance_type']} set to ${data['usd_per_hour']:g}/h "
                              f"for {data['cores']} NeuronCores.")
    return redirect("site_usage")


@login_required
@require_POST
def price_delete(request: HttpRequest, price_id: int) -> HttpResponse:
    """Remove an admin price: the instance type goes back to its on-demand default."""
    pages.require_staff(request)
    price = InstancePrice.objects.filter(pk=price_id).first()
    if price is None:
        raise Http404("No such price")
    price.delete()
    messages.success(request, f"{price.instance_type} is back to its on-demand default price.")
    return redirect("site_usage")
