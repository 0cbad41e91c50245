"""How the CLI prints: aligned tables and short summaries for people, the API's
documents for `--json`, and progress on stderr (so stdout stays clean for pipes)."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    text = str(value)
    if len(text) >= 19 and text[4:5] == "-" and text[10:11] == "T":  # an ISO timestamp: to the second
        text = text[:19].replace("T", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def figure(value: Any, unit: str = "") -> str:
    """A measured figure for people: "-" when there is none (nothing measured yet)."""
    text = _cell(value)
    if not text:
        return "-"
    return f"{text} {unit}" if unit else text


def table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    if not rows:
        click.echo("(none)")
        return
    cells = [[_cell(row.get(key)) for _, key in columns] for row in rows]
    widths = [max(len(title), *(len(r[i]) for r in cells)) for i, (title, _) in enumerate(columns)]
    click.echo("  ".join(title.ljust(w) for (title, _), w in zip(columns, widths)).rstrip())
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def job(doc: dict) -> None:
    facts = [("job", doc["id"]), ("team", doc["team"]), ("kind", doc["kind"]), ("status", doc["status"]),
             ("user", doc["user"]), ("family", doc["family"]), ("cores", doc["cores"]),
             ("host", doc.get("host")), ("core range", doc.get("core_range")),
             ("queue position", doc.get("queue_position")), ("attempts", f"{doc['attempts']}/{doc['max_attempts']}"),
             ("reason", doc.get("reason")), ("failure", doc.get("failure")),
             ("created", doc["created_at"]), ("started", doc.get("started_at")), ("finished", doc.get("finished_at"))]
    for label, value in facts:
        if value not in (None, ""):
            click.echo(f"{label:>15}: {_cell(value)}")
    for artifact in doc.get("artifacts") or []:
        click.echo(f"{'artifact':>15}: {artifact['name']} ({artifact['size_bytes']} bytes)")
    if doc.get("events"):
        click.echo("timeline:")
        for event in doc["events"][-10:]:
            click.echo(f"  {_cell(event['at'])}  {event['kind']:<10} {event['message']}")


def pending(job_id: int, why: dict) -> None:
    reason = why.get("reason") or ("it is not waiting" if why["status"] != "pending" else "")
    click.echo(f"job {job_id} is {why['status']}" + (f": {reason}" if reason else ""))
    if why.get("hint"):
        click.echo(f"hint: {why['hint']}")
    if why.get("position"):
        click.echo(f"position {why['position']} of {why['queue_length']} in the {why['family']} queue")
    for ahead in why.get("ahead") or []:
        who = f"job {ahead['id']}" if ahead.get("id") else "another team's job"
        click.echo(f"  ahead: {who} ({ahead['team']}, {ahead['cores']} cores)")


def usage(doc: dict) -> None:
    totals, burn = doc["totals"], doc["burn_down"]
    click.echo(f"team {doc['team']}, {doc['from']} to {doc['to']} ({doc['time_zone']})")
    for key in sorted(totals):
        click.echo(f"{key:>28}: {figure(totals[key])}")
    budget = burn.get("budget_core_hours")
    click.echo(f"{'budget':>28}: {burn['used_core_hours']} of {budget if budget is not None else 'unlimited'} "
               f"core-hours ({burn['status']})")
    if doc.get("groups"):
        table(doc["groups"], [(k.upper(), k) for k in doc["groups"][0]])


def upload_progress(quiet: bool) -> Callable[[int, int], None] | None:
    """A callback drawing `sent / total` on stderr, or None when quiet."""
    if quiet or not sys.stderr.isatty():
        return None
    def draw(sent: int, total: int) -> None:
        pct = 100 * sent // total if total else 100
        click.echo(f"\ruploading {sent / 1e6:.1f} / {total / 1e6:.1f} MB ({pct}%)", err=True, nl=sent >= total)
    return draw


class Progress:
    """A one-line status on stderr while waiting (a plain line per change when
    stderr is not a terminal, e.g. in CI logs)."""

    def __init__(self, label: str, quiet: bool):
        self.label, self.quiet, self.last = label, quiet, None
        self.tty = sys.stderr.isatty()

    def __enter__(self) -> Progress:
        return self

    def update(self, status: str, detail: str) -> None:
        line = f"{self.label}: {status}" + (f" - {detail}" if detail else "")
        if self.quiet or line == self.last:
            return
        self.last = line
        if self.tty:
            click.echo(f"\r\033[K{line}", err=True, nl=False)
        else:
            click.echo(line, err=True)

    def __exit__(self, *exc) -> None:
        if self.tty and not self.quiet and self.last:
            click.echo("", err=True)
