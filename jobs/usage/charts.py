"""Pure Plotly figure builders for the usage pages: zero-filled series in (the
rows of the tables jobs.selectors_usage builds, which are also the CSV), a
JSON-ready figure dict out. No Django, no database.

Colours are the Okabe–Ito palette, chosen to stay distinguishable with the common
colour-vision deficiencies; stacked series also differ in order and legend, and
every hover names the series, the day and the unit."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"

# Okabe & Ito (2008), "Color Universal Design"; black last (used for lines).
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
USED, IDLE, UNKNOWN = "#009E73", "#D55E00", "#BBBBBB"  # bluish green, vermillion, neutral grey
COST, IDLE_COST, BUDGET, FORECAST = "#0072B2", "#D55E00", "#000000", "#E69F00"


def _layout(title: str, y_title: str, *, x_title: str = "", barmode: str | None = None, legend: bool = True,
            height: int = 320) -> dict:
    # The page's card heading names the chart, so the title is not drawn again;
    # it stays in `meta` for whoever reads the figure (CSV users, tests).
    layout = {
        "meta": {"title": title},
        "font": {"family": FONT, "size": 12},
        "margin": {"l": 60, "r": 16, "t": 12, "b": 40},
        "height": height,
        "xaxis": {"title": {"text": x_title}, "zeroline": False},
        "yaxis": {"title": {"text": y_title}, "rangemode": "tozero"},
        "showlegend": legend,
        "legend": {"orientation": "h", "y": -0.18},
        "hovermode": "x unified",
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "rgba(0,0,0,0)",
    }
    if barmode:
        layout["barmode"] = barmode
    return layout


def color(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


def stacked_hours(days: Sequence[str], series: Mapping[str, Sequence[float]], *, by: str) -> dict:
    """NeuronCore-hours per day, one stacked bar trace per group (kind / user / family / team)."""
    data = []
    for i, (name, values) in enumerate(series.items()):
        data.append({
            "type": "bar", "name": name, "x": list(days), "y": [float(v) for v in values],
            "marker": {"color": color(i)},
            "hovertemplate": f"{name}: %{{y:.2f}} NeuronCore-h<extra></extra>",
        })
    return {"data": data, "layout": _layout(f"NeuronCore-hours per day, by {by}", "NeuronCore-hours",
                                            barmode="stack")}


def allocated_vs_used(days: Sequence[str], used: Sequence[float], idle: Sequence[float], unknown: Sequence[float],
                      idle_cost: Sequence[float]) -> dict:
    """Allocated hours per day split into used, idle-but-allocated and not measured;
    the bar heights add up to the allocated hours."""
    return {
        "data": [
            {"type": "bar", "name": "used (allocated × measured utilization)", "x": list(days), "y": list(used),
             "marker": {"color": USED}, "hovertemplate": "used: %{y:.2f} NeuronCore-h<extra></extra>"},
            {"type": "bar", "name": "idle but allocated", "x": list(days), "y": list(idle),
             "marker": {"color": IDLE, "pattern": {"shape": "/"}}, "customdata": list(idle_cost),
             "hovertemplate": "idle: %{y:.2f} NeuronCore-h ($%{customdata:.2f})<extra></extra>"},
            {"type": "bar", "name": "not measured", "x": list(days), "y": list(unknown),
             "marker": {"color": UNKNOWN, "pattern": {"shape": "."}},
             "hovertemplate": "not measured: %{y:.2f} NeuronCore-h<extra></extra>"},
        ],
        "layout": _layout("Allocated vs used NeuronCore-hours", "NeuronCore-hours", barmode="stack"),
    }


def cost_per_day(days: Sequence[str], cost: Sequence[float], idle_cost: Sequence[float]) -> dict:
    """Cost per day, with the part spent on idle-but-allocated cores overlaid."""
    return {
        "data": [
            {"type": "bar", "name": "cost", "x": list(days), "y": list(cost), "marker": {"color": COST},
             "hovertemplate": "cost: $%{y:.2f}<extra></extra>"},
            {"type": "bar", "name": "of which idle", "x": list(days), "y": list(idle_cost),
             "marker": {"color": IDLE_COST, "pattern": {"shape": "/"}}, "width": 0.4 * 86400000,
             "hovertemplate": "idle: $%{y:.2f}<extra></extra>"},
        ],
        "layout": _layout("Cost per day (USD)", "USD", barmode="overlay"),
    }


def burn_down(days: Sequence[str], actual: Sequence[float | None], forecast: Sequence[float | None],
              budget: float | None, run_out_day: str | None) -> dict:
    """Cumulative NeuronCore-hours this month against the budget, with the linear
    forecast from now and a marker on the day it runs out."""
    data = [
        {"type": "scatter", "mode": "lines+markers", "name": "used so far", "x": list(days), "y": list(actual),
         "line": {"color": COST, "width": 2}, "marker": {"size": 4},
         "hovertemplate": "used: %{y:.1f} NeuronCore-h<extra></extra>"},
        {"type": "scatter", "mode": "lines", "name": "forecast (recent burn rate)", "x": list(days),
         "y": list(forecast), "line": {"color": FORECAST, "width": 2, "dash": "dash"},
         "hovertemplate": "forecast: %{y:.1f} NeuronCore-h<extra></extra>"},
    ]
    if budget is not None:
        data.append({"type": "scatter", "mode": "lines", "name": "budget", "x": [days[0], days[-1]] if days else [],
                     "y": [budget, budget], "line": {"color": BUDGET, "width": 1, "dash": "dot"},
                     "hovertemplate": f"budget: {budget:g} NeuronCore-h<extra></extra>"})
    layout = _layout("Budget burn-down this month", "NeuronCore-hours (cumulative)")
    if run_out_day and days and days[0] <= run_out_day <= days[-1]:
        layout["shapes"] = [{"type": "line", "x0": run_out_day, "x1": run_out_day, "yref": "paper", "y0": 0, "y1": 1,
                             "line": {"color": IDLE, "width": 1, "dash": "dot"}}]
        layout["annotations"] = [{"x": run_out_day, "yref": "paper", "y": 1, "text": f"runs out {run_out_day}",
                                  "showarrow": False, "xanchor": "right", "font": {"color": IDLE}}]
    return {"data": data, "layout": layout}


def queue_wait(kinds: Sequence[str], p50_s: Sequence[float | None], p95_s: Sequence[float | None],
               counts: Sequence[int]) -> dict:
    """Queue wait p50 / p95 per kind, in minutes."""
    def minutes(values):
        return [None if v is None else round(v / 60.0, 2) for v in values]

    return {
        "data": [
            {"type": "bar", "name": "p50", "x": list(kinds), "y": minutes(p50_s), "marker": {"color": OKABE_ITO[4]},
             "customdata": list(counts), "hovertemplate": "p50: %{y:.1f} min (%{customdata} jobs)<extra></extra>"},
            {"type": "bar", "name": "p95", "x": list(kinds), "y": minutes(p95_s), "marker": {"color": OKABE_ITO[0]},
             "customdata": list(counts), "hovertemplate": "p95: %{y:.1f} min (%{customdata} jobs)<extra></extra>"},
        ],
        "layout": _layout("Queue wait (submit → first start)", "minutes", barmode="group"),
    }


def outcome_rates(kinds: Sequence[str], succeeded: Sequence[int], failed: Sequence[int],
                  cancelled: Sequence[int]) -> dict:
    """Finished jobs per kind as 100 % stacked bars: succeeded / failed / cancelled."""
    def share(part, i):
        total = succeeded[i] + failed[i] + cancelled[i]
        return round(100.0 * part[i] / total, 2) if total else 0.0

    n = range(len(kinds))
    data = []
    for name, part, colour in (("succeeded", succeeded, USED), ("failed", failed, IDLE),
                               ("cancelled", cancelled, OKABE_ITO[3])):
        data.append({"type": "bar", "name": name, "x": list(kinds), "y": [share(part, i) for i in n],
                     "customdata": list(part), "marker": {"color": colour},
                     "hovertemplate": f"{name}: %{{y:.1f}} % (%{{customdata}} jobs)<extra></extra>"})
    layout = _layout("Finished jobs by outcome", "% of finished jobs", barmode="stack")
    layout["yaxis"]["range"] = [0, 100]
    layout["hovermode"] = "closest"
    return {"data": data, "layout": layout}


def fleet_utilization(days: Sequence[str], utilization_pct: Sequence[float | None],
                      allocated_share_pct: Sequence[float | None]) -> dict:
    """Site: measured utilization of allocated cores, and allocated share of capacity."""
    return {
        "data": [
            {"type": "scatter", "mode": "lines+markers", "name": "utilization of allocated cores (measured)",
             "x": list(days), "y": list(utilization_pct), "line": {"color": USED, "width": 2},
             "connectgaps": False, "hovertemplate": "utilization: %{y:.1f} %<extra></extra>"},
            {"type": "scatter", "mode": "lines", "name": "allocated share of current capacity", "x": list(days),
             "y": list(allocated_share_pct), "line": {"color": COST, "width": 2, "dash": "dash"},
             "hovertemplate": "allocated: %{y:.1f} % of capacity<extra></extra>"},
        ],
        "layout": _layout("Fleet utilization", "%"),
    }
