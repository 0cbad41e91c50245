"""Plotly figure dicts for the live pages (pure: series in, figure out).

The series come from jobs.metrics (job_series, host_series, fleet); the templates
hand the figures over with json_script and jobs/static/live/live.js draws them,
then extends their traces in place as points arrive. So the trace order set
here is a contract with live.js:

* job utilization: one line per core, in `series["cores"]` order — or, above
  LINE_LIMIT cores, one heatmap trace like the host's (z rows = time points);
* job memory: [device memory, host memory]; latency: [p50, p99];
  executions: [errors, completed];
* host heatmap: one heatmap trace, z rows = time points (transposed for display);
  host memory: one bar trace; host system: [vCPU busy, host memory used].

Colours are colour-blind safe: the Okabe-Ito palette for up to eight lines,
evenly spaced Viridis samples beyond, and Viridis for heatmaps. Times are ms since
the epoch on date axes (UTC).
"""
from __future__ import annotations

from typing import Any

from plotly.colors import sample_colorscale

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
UTIL_SCALE = "Viridis"
CONFIG = {"responsive": True, "displaylogo": False}
_FONT = {"family": "system-ui, -apple-system, Segoe UI, Roboto, Arial, sans-serif", "size": 12}


def line_colors(n: int) -> list[str]:
    """`n` distinguishable, colour-blind-safe line colours."""
    if n <= len(OKABE_ITO):
        return OKABE_ITO[:n]
    return sample_colorscale(UTIL_SCALE, [i / (n - 1) * 0.9 for i in range(n)])


def _title(text: str, note: str = "") -> dict:
    """A chart's title; a note goes below it in small grey type, as Plotly's subtitle
    (a styled <span> in the title would need an inline style, refused by the CSP)."""
    title: dict[str, Any] = {"text": text, "x": 0, "xanchor": "left", "font": {"size": 14}}
    if note:
        title["subtitle"] = {"text": f"({note})", "font": {"size": 11, "color": "#656d76"}}
    return title


MIN_SPAN_MS = 10_000  # a time axis spans at least this, centred on the points
MIN_BYTES = 1 << 20  # a memory axis reaches at least this: never an axis of fractional bytes


def _time_axis(t: list | None) -> dict:
    """A date axis. With one point, or points a few seconds apart (a short job), its
    range still spans MIN_SPAN_MS around them: Plotly alone would stretch a lone point
    over a millisecond. More points widen the range as usual (live.js appends)."""
    axis: dict[str, Any] = {"type": "date", "automargin": True}
    if t:
        span = t[-1] - t[0]
        if span < MIN_SPAN_MS:
            mid = t[0] + span / 2
            axis["autorangeoptions"] = {"include": [mid - MIN_SPAN_MS / 2, mid + MIN_SPAN_MS / 2]}
    return axis


def _layout(title: str, yaxis: dict, note: str = "", t: list | None = None, **extra: Any) -> dict:
    """A chart's layout; `t` is the chart's time points, for the x axis's range."""
    return {
        "title": _title(title, note),
        "font": _FONT,
        "margin": {"l": 56, "r": 16, "t": 52 if note else 36, "b": 36},
        "height": 280,
        # A constant uirevision keeps the user's zoom and hidden traces while points
        # are appended.
        "uirevision": "live",
        "xaxis": _time_axis(t),
        "yaxis": {"automargin": True, **yaxis},
        # The legend sits at the bottom of the whole figure (container coordinates),
        # below the x axis's tick labels however many lines they take: on a phone the
        # date ticks wrap to two lines and a legend placed relative to the plot area
        # overlapped them.
        "legend": {"orientation": "h", "x": 0, "xanchor": "left", "y": 0, "yref": "container", "yanchor": "bottom"},
        "hovermode": "x unified",
        **extra,
    }


def _line(name: str, x: list, y: list, color: str, **extra: Any) -> dict:
    """A line; with a single point so far, a line plus a marker (a lone point has no
    line to draw); live.js switches to a plain line once a second point arrives."""
    return {"type": "scatter", "mode": "lines+markers" if len(x) == 1 else "lines", "name": name, "x": x, "y": y,
            "line": {"color": color, "width": 1.5}, "marker": {"color": color, "size": 6}, "connectgaps": False,
            **extra}


def _note(series: dict) -> str:
    parts = []
    if series.get("resolution_s"):
        parts.append(f"history averaged over {series['resolution_s']:g} s")
    if series.get("replay"):
        parts.append("replayed recording")
    return "; ".join(parts)


LINE_LIMIT = 8  # more cores than this: a core × time heatmap instead of one line per core

# What each job chart draws from a metrics response, in trace order (live.js extends
# these series of each response into the chart's traces, in this order). The
# utilization chart ("util") is per core and handled on its own.
JOB_SERIES = {"mem": ["device_mem", "host_mem"], "lat": ["lat_p50_ms", "lat_p99_ms"], "exec": ["errors", "completed"]}
CPU_JOB_SERIES = {"mem": ["host_mem"]}


def is_cpu(series: dict, family: str | None = None) -> bool:
    """Whether the job's charts show a CPU host's OS metrics ("host" points) rather
    than NeuronCores: known from the points once there are any, before that from the
    family the job runs on (a cpu-family host publishes "host" points), so the
    charts are named the same live and after a reload."""
    kind = series.get("kind")
    return kind == "host" if kind else family == "cpu"


def job_chart_names(series: dict, family: str | None = None, kind: str | None = None) -> list[str]:
    """The job charts a host can fill: on a CPU host there is no device memory, and
    execution latency / counts exist only where the job reports them (Neuron
    runtimes do; a cpu inference job reports its own requests, jobs.live.requests)."""
    if not is_cpu(series, family):
        return ["util", "mem", "lat", "exec"]
    return ["util", "mem", "lat", "exec"] if kind == "inference" else ["util", "mem"]


def job_util_figure(series: dict, family: str | None = None) -> dict:
    """Per-core utilization: a line per core for up to LINE_LIMIT cores (Okabe-Ito
    colours stay distinguishable), else a heatmap with a row per core — 32 lines are
    unreadable, and a heatmap's redraw cost does not grow with the points shown,
    which keeps a 32-core page responsive after an hour of live points."""
    cpu = is_cpu(series, family)
    label = "slot" if cpu else "core"
    title = "CPU use of the job's slots (%)" if cpu else "NeuronCore utilization (%)"
    # A pending job has no cores yet: decide by what it asked for.
    if max(len(series["cores"]), series.get("requested_cores") or 0) > LINE_LIMIT:
        figure = host_heatmap_figure(series, rows=series.get("requested_cores"))
        figure["layout"]["title"] = _title(title, _note(series))
        figure["layout"]["yaxis"]["title"] = {"text": label}
        return figure
    colors = line_colors(len(series["cores"]))
    data = [_line(f"{label} {core}", series["t"], series["util"][i], colors[i],
                  hovertemplate="%{y:.1f} %<extra>" + f"{label} {core}</extra>")
            for i, core in enumerate(series["cores"])]
    return {"data": data, "layout": _layout(title, {"range": [0, 100], "title": {"text": "%"}}, note=_note(series),
                                                     t=series["t"])}


_BYTES_AXIS = {"tickformat": ".3~s", "ticksuffix": "B", "rangemode": "tozero",
               "autorangeoptions": {"include": [0, MIN_BYTES]}}


def _bytes_axis(series: dict, *columns: list) -> dict:
    """A memory axis from 0 to at least MIN_BYTES. Plotly ignores that minimum on a
    chart with no values at all, so a finished job's empty chart gets it as a fixed
    range (a live chart keeps autoranging for the values still to come)."""
    if not series.get("live") and all(v is None for column in columns for v in column):
        return {**_BYTES_AXIS, "range": [0, MIN_BYTES]}
    return dict(_BYTES_AXIS)


def job_memory_figure(series: dict, family: str | None = None) -> dict:
    host = _line("host memory", series["t"], series["host_mem"], OKABE_ITO[1],
                 line={"color": OKABE_ITO[1], "width": 1.5, "dash": "dot"})
    if is_cpu(series, family):  # no device memory on a CPU host: the job's processes' memory alone
        host["name"] = "memory (RSS)"
        layout = _layout("Memory of the job's processes", _bytes_axis(series, series["host_mem"]), t=series["t"])
        return {"data": [host], "layout": layout}
    data = [_line("device memory", series["t"], series["device_mem"], OKABE_ITO[0]), host]
    return {"data": data, "layout": _layout("Memory", _bytes_axis(series, series["device_mem"], series["host_mem"]),
                                            t=series["t"])}


def job_latency_figure(series: dict) -> dict:
    data = [_line("p50", series["t"], series["lat_p50_ms"], OKABE_ITO[0]),
            _line("p99", series["t"], series["lat_p99_ms"], OKABE_ITO[5])]
    return {"data": data, "layout": _layout("Execution latency (ms)",
                                            {"title": {"text": "ms"}, "rangemode": "tozero"}, t=series["t"])}


def job_executions_figure(series: dict) -> dict:
    data = [
        {"type": "bar", "name": "errors", "x": series["t"], "y": series["errors"],
         "marker": {"color": OKABE_ITO[5]}},
        _line("completed", series["t"], series["completed"], OKABE_ITO[2], yaxis="y2"),
    ]
    layout = _layout("Executions and errors per sample", {"title": {"text": "errors"}, "rangemode": "tozero"},
                     yaxis2={"title": {"text": "completed"}, "overlaying": "y", "side": "right",
                             "rangemode": "tozero", "showgrid": False}, t=series["t"], bargap=0)
    layout["margin"]["r"] = 56
    return {"data": data, "layout": layout}


def job_figures(series: dict, family: str | None = None, names: list[str] | None = None) -> dict[str, dict]:
    """The job page's charts (all four, or `names`), keyed by the names live.js extends."""
    builders = {"util": lambda: job_util_figure(series, family), "mem": lambda: job_memory_figure(series, family),
                "lat": lambda: job_latency_figure(series), "exec": lambda: job_executions_figure(series)}
    return {name: builders[name]() for name in (names or list(builders))}


def job_series_keys(series: dict, family: str | None = None, names: list[str] | None = None) -> dict[str, list[str]]:
    """Per shown chart (but util), the response series live.js appends, in trace order."""
    keys = {**JOB_SERIES, **(CPU_JOB_SERIES if is_cpu(series, family) else {})}
    return {name: keys[name] for name in (names or list(keys)) if name in keys}


# --- host ---------------------------------------------------------------------------

def _rows(series: dict) -> list[list[float | None]]:
    """util columns (per core) -> rows (per time point), the heatmap's z."""
    return [list(row) for row in zip(*series["util"])] if series["util"] and series["t"] else []


def host_heatmap_figure(series: dict, rows: int | None = None) -> dict:
    """Core × time heatmap; `rows` sizes it when the cores are not known yet."""
    cores = series["cores"]
    trace = {
        "type": "heatmap", "x": series["t"], "y": [str(c) for c in cores], "z": _rows(series), "transpose": True,
        "zmin": 0, "zmax": 100, "colorscale": UTIL_SCALE, "colorbar": {"title": {"text": "%"}, "thickness": 12},
        "hovertemplate": "core %{y}<br>%{x}<br>%{z:.1f} %<extra></extra>", "hoverongaps": False,
        # A 1 px gap between cores' rows. Without gaps Plotly.js draws an evenly spaced
        # heatmap as a small image scaled up with a style="image-rendering: pixelated"
        # attribute, which the Content-Security-Policy refuses.
        "ygap": 1,
    }
    label = "CPU job slots" if series.get("kind") == "host" else "NeuronCore"
    layout = _layout(f"{label} utilization over time",
                     {"title": {"text": "core"}, "type": "category", "autorange": True}, note=_note(series),
                     t=series["t"],
                     height=max(260, 18 * max(len(cores), rows or 0) + 90), hovermode="closest")
    return {"data": [trace], "layout": layout}


def host_memory_figure(series: dict) -> dict:
    cores = [str(c) for c in series["cores"]]
    latest = [col[-1] if col else None for col in series["mem"]]
    trace = {"type": "bar", "x": cores, "y": latest, "marker": {"color": OKABE_ITO[0]}, "name": "device memory",
             "hovertemplate": "core %{x}: %{y:.3s}B<extra></extra>"}
    layout = _layout("Device memory per core (now)", dict(_BYTES_AXIS),
                     hovermode="closest")
    layout["xaxis"] = {"type": "category", "title": {"text": "core"}}
    return {"data": [trace], "layout": layout}


def host_system_figure(series: dict) -> dict:
    data = [_line("vCPU busy %", series["t"], series["vcpu_busy"], OKABE_ITO[0]),
            _line("host memory used", series["t"], series["host_mem_used"], OKABE_ITO[1], yaxis="y2")]
    layout = _layout("vCPU and host memory", {"range": [0, 100], "title": {"text": "vCPU %"}}, t=series["t"],
                     yaxis2={**_BYTES_AXIS, "overlaying": "y", "side": "right", "showgrid": False,
                             **({"range": [0, series["host_mem_total"]]} if series.get("host_mem_total") else {})})
    layout["margin"]["r"] = 64
    return {"data": data, "layout": layout}


def host_figures(series: dict) -> dict[str, dict]:
    return {"heat": host_heatmap_figure(series), "mem": host_memory_figure(series), "sys": host_system_figure(series)}


# --- fleet --------------------------------------------------------------------------

def fleet_figure(fleet: dict) -> dict:
    """All hosts (rows) × core index (columns), coloured by current utilization.
    Cells with no fresh sample stay blank; allocated cores carry a ring and
    allocated-but-idle cores a cross (white with a dark edge, visible on every
    colour of the scale), so an idle reservation or an orphan stands out."""
    hosts = fleet["hosts"]
    width = max((len(h["cores"]) for h in hosts), default=0)
    names = [h["name"] + (" (replay)" if h["replay"] else "") for h in hosts]
    z, text = [], []
    held_x, held_y, idle_x, idle_y = [], [], [], []
    for h, name in zip(hosts, names):
        row = [None] * width
        labels = [""] * width
        for i, core in enumerate(h["cores"]):
            row[i] = h["util"][i]
            labels[i] = _cell_label(h, i, core)
            if h["idle"][i]:
                idle_x.append(i)
                idle_y.append(name)
            elif h["held"][i]:
                held_x.append(i)
                held_y.append(name)
        z.append(row)
        text.append(labels)
    data = [
        {"type": "heatmap", "z": z, "x": list(range(width)), "y": names, "text": text, "zmin": 0, "zmax": 100,
         "colorscale": UTIL_SCALE, "xgap": 2, "ygap": 2, "hoverongaps": False,
         "hovertemplate": "%{text}<extra></extra>",
         # The title beside the bar (not above it, where it ran into the "100" label) and
         # a bar at least FLEET_COLORBAR_PX tall with three labels, however few hosts.
         "colorbar": {"title": {"text": "utilization %", "side": "right"}, "thickness": 12,
                      "tickvals": [0, 50, 100], "len": 1, "lenmode": "fraction", "outlinewidth": 0},
         "name": "utilization"},
        {"type": "scatter", "mode": "markers", "x": held_x, "y": held_y, "name": "allocated, busy",
         "hoverinfo": "skip", "marker": {"symbol": "circle", "size": 7, "color": "#ffffff",
                                          "line": {"width": 1, "color": "#000000"}}},
        {"type": "scatter", "mode": "markers", "x": idle_x, "y": idle_y, "name": "allocated but idle",
         "hoverinfo": "skip", "marker": {"symbol": "x", "size": 11, "color": "#ffffff",
                                          "line": {"width": 1.5, "color": "#000000"}}},
    ]
    layout = {
        "font": _FONT, "height": min(max(FLEET_MIN_HEIGHT, 110 + 30 * len(hosts)), 4000), "uirevision": "fleet",
        # Host names set the left margin (automargin); a phone keeps its width for the cells.
        "margin": {"l": 8, "r": 8, "t": 16, "b": 40},
        "xaxis": {"title": {"text": "core"}, "dtick": 1 if width <= 32 else 4, "zeroline": False, "showgrid": False,
                  "range": [-0.5, width - 0.5]},
        "yaxis": {"type": "category", "autorange": "reversed", "automargin": True, "showgrid": False},
        # The markers' legend above the cells (it pushes the top margin as it needs).
        "legend": {"orientation": "h", "x": 0, "xanchor": "left", "y": 1.02, "yanchor": "bottom"},
        "showlegend": True,
        "plot_bgcolor": "#eef0f3",
    }
    return {"data": data, "layout": layout}


FLEET_MIN_HEIGHT = 240  # px: room for the colour bar's three labels with one or two hosts


def _cell_label(host: dict, i: int, core: int) -> str:
    util = host["util"][i]
    parts = [f"{host['name']} core {core}", "no recent sample" if util is None else f"{util:.1f} %"]
    if host["held"][i]:
        job = host["job"][i]
        parts.append(f"held by job {job}" if job is not None else "held by another team's job")
        if host["idle"][i]:
            parts.append("allocated but idle")
    return "<br>".join(parts)
