"""Pure Plotly figure builders: series in, a figure dict (JSON-ready) out.

Templates hand the dict to the browser with `json_script`; the page's script only
draws it with the locally served Plotly.js. No Django, no database here."""
from __future__ import annotations

from collections.abc import Sequence

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
ACCENT = "#2563eb"


def base_layout(title: str, x_title: str, y_title: str) -> dict:
    """The layout every NeuronDeck chart shares: small margins, system font, no title bar clutter."""
    return {
        "title": {"text": title, "font": {"size": 14}},
        "font": {"family": FONT, "size": 12},
        "margin": {"l": 56, "r": 16, "t": 40, "b": 44},
        "height": 300,
        "xaxis": {"title": {"text": x_title}, "zeroline": False},
        "yaxis": {"title": {"text": y_title}, "zeroline": False},
        "showlegend": False,
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "rgba(0,0,0,0)",
    }


def loss_figure(steps: Sequence[int], losses: Sequence[float], title: str = "Training loss",
                resumes: Sequence[int] = ()) -> dict:
    """A line chart of loss per step, one curve across attempts, with a dashed line at
    each step a later attempt resumed from. Steps and losses must have the same
    length; an empty series gives an empty chart with an annotation instead of an error."""
    if len(steps) != len(losses):
        raise ValueError(f"steps ({len(steps)}) and losses ({len(losses)}) differ in length")
    layout = base_layout(title, "step", "loss")
    if not steps:
        layout["annotations"] = [{"text": "no loss recorded yet", "showarrow": False,
                                  "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}]
    if resumes:
        layout["shapes"] = [{"type": "line", "xref": "x", "yref": "paper", "x0": step, "x1": step, "y0": 0, "y1": 1,
                             "line": {"color": "#7c3aed", "width": 1, "dash": "dash"}} for step in resumes]
        layout.setdefault("annotations", []).extend(
            {"text": f"resumed @{step}", "showarrow": False, "xref": "x", "yref": "paper", "x": step, "y": 1,
             "xanchor": "left", "yanchor": "bottom", "font": {"size": 10, "color": "#7c3aed"}} for step in resumes)
    return {
        "data": [{
            "type": "scatter", "mode": "lines+markers" if len(steps) <= 60 else "lines",
            "x": list(steps), "y": [float(v) for v in losses], "name": "loss",
            "line": {"color": ACCENT, "width": 2}, "marker": {"size": 4},
            "hovertemplate": "step %{x}<br>loss %{y:.4f}<extra></extra>",
        }],
        "layout": layout,
    }

HOST_COLORS = ("#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2", "#dc2626", "#4b5563")


def host_util_figure(rows: Sequence[dict], unit: str = "NeuronCore") -> dict:
    """A multi-host job's utilization per host over time: one line per host of the gang
    (the mean of its rank's cores), from jobs.live.metrics.gang_host_util's rows.
    x is milliseconds since the epoch on a date axis."""
    layout = base_layout(f"{unit} utilization by host", "time", "% (mean of the rank's cores)")
    layout["xaxis"]["type"] = "date"
    layout["yaxis"]["range"] = [0, 100]
    layout["showlegend"] = True
    layout["legend"] = {"orientation": "h", "y": -0.25}
    layout["margin"]["b"] = 64
    if not any(row["t"] for row in rows):
        layout["annotations"] = [{"text": "no samples from the gang's hosts yet", "showarrow": False,
                                  "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}]
    layout["colorway"] = list(HOST_COLORS)  # host i keeps its colour when the page redraws the traces
    return {"data": [host_util_trace(row) for row in rows], "layout": layout}


def host_util_trace(row: dict) -> dict:
    """One host's line (job.js builds the same from the status poll's rows)."""
    return {"type": "scatter", "mode": "lines+markers" if len(row["t"]) <= 60 else "lines",
            "x": list(row["t"]), "y": list(row["util"]), "name": f"rank {row['rank']} · {row['host']}",
            "line": {"width": 2}, "marker": {"size": 4},
            "hovertemplate": "%{fullData.name}<br>%{y:.1f} %<extra></extra>"}
