"""The `neurondeck` commands. Each is a few API calls; what the API refuses is shown
with the API's own sentence. `--json` prints the API's document instead of a table."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml

from jobs.cli import output
from jobs.cli.client import Api, ApiError, normalize_url, save_login
from jobs.cli.jobfile import job_body

FINISHED = {"succeeded", "failed", "cancelled"}
POLL_S = 1.0
# Flags of `submit` that map one to one onto fields of the API body.
SUBMIT_FIELDS = {
    "team": str, "kind": str, "family": str, "cores": int, "host_count": int, "same_network": bool,
    "max_runtime_s": int, "model": int, "dataset": int,
    "batch_size": int, "sequence_length": int, "compiler_options": str, "steps": int, "epochs": int,
    "learning_rate": float, "seed": int, "max_new_tokens": int, "temperature": float, "checkpoint_every": int,
}

json_option = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON document.")


def _api() -> Api:
    return Api.from_login()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="neurondeck", message="neurondeck %(version)s")
def cli() -> None:
    """NeuronDeck from the command line: submit and follow compile, fine-tune and
    inference jobs. Start with `neurondeck login URL`."""


# --- login ----------------------------------------------------------------------------

@cli.command()
@click.argument("url")
@click.option("--token", help="An API token from the Tokens page (asked for when not given).")
@json_option
def login(url: str, token: str | None, as_json: bool) -> None:
    """Check a token against the server at URL and store both (mode 0600)."""
    url = normalize_url(url)
    if not token:
        click.echo(f"Create a token at {url}/tokens/ and paste it here.", err=True)
        token = click.prompt("API token", hide_input=True).strip()
    try:
        teams = Api(url, token).get("/teams")
    except ApiError as exc:
        if exc.status == 404 and "code" not in exc.body:  # a page, not the API: e.g. a URL copied with its path
            raise ApiError(f"no NeuronDeck API at {url}/api/v1/: give the console's address, without a path "
                           "(as in http://127.0.0.1:8000)") from exc
        raise
    path = save_login(url, token)
    if as_json:
        output.emit_json({"url": url, "config": str(path), "teams": teams})
        return
    names = ", ".join(f"{t['slug']} ({t['role']})" for t in teams) or "no team yet"
    click.echo(f"Logged in to {url}; teams: {names}. Saved in {path}.")


# --- submit -----------------------------------------------------------------------------

def _parse_set(pairs: tuple[str, ...]) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE is read as YAML, so numbers and lists keep their type."""
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--set")
        values[key.strip()] = yaml.safe_load(raw) if raw else ""
    return values


def _job_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        body = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--file") from exc
    if not isinstance(body, dict):
        raise click.BadParameter(f"{path} must hold a mapping of API fields (team, kind, ...)", param_hint="--file")
    return body


def _default_team(api: Api, body: dict[str, Any]) -> None:
    """A user in one team need not name it."""
    if body.get("team"):
        return
    teams = [t for t in api.get("/teams") if t["role"] in ("member", "manager")]
    if len(teams) != 1:
        raise click.UsageError("name the team with --team (you can submit to: "
                               f"{', '.join(t['slug'] for t in teams) or 'no team'})")
    body["team"] = teams[0]["slug"]


def _submit(api: Api, body: dict[str, Any], prompts_file: Path | None, quiet: bool) -> dict[str, Any]:
    if prompts_file is None:
        return api.post("/jobs", body)
    fields = {k: (" ".join(v) if isinstance(v, list) else v) for k, v in body.items()}
    return api.post_multipart("/jobs", fields, "prompts_file", prompts_file, output.upload_progress(quiet))


@cli.command()
@click.argument("kind", required=False, type=click.Choice(["compile", "finetune", "inference"]))
@click.option("-f", "--file", "job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A job file in YAML with the API body's fields; flags override it.")
@click.option("--team")
@click.option("--family", type=click.Choice(["inf2", "trn1", "trn2", "cpu"]))
@click.option("--cores", type=int, help="In all: on several hosts, the host count times one host's cores.")
@click.option("--hosts", "host_count", type=int, help="Whole hosts to run on at once (fine-tune).")
@click.option("--same-network", is_flag=True, default=None, help="Keep the hosts inside one network (EFA domain).")
@click.option("--max-runtime", "max_runtime_s", type=int, help="Seconds.")
@click.option("--model", type=int, help="Model id (see `neurondeck models`).")
@click.option("--dataset", type=int, help="Dataset id (see `neurondeck datasets`).")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeat for several).")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A JSONL or text file of prompts, uploaded.")
@click.option("--max-new-tokens", type=int)
@click.option("--temperature", type=float)
@click.option("--steps", type=int)
@click.option("--epochs", type=int)
@click.option("--learning-rate", type=float)
@click.option("--seed", type=int)
@click.option("--checkpoint-every", type=int, help="Fine-tune: steps between checkpoints (default 100).")
@click.option("--batch-size", type=int)
@click.option("--sequence-length", type=int)
@click.option("--compiler-options", help="neuronx-cc flags, e.g. '--model-type=transformer -O2'.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any other API field.")
@click.option("--wait", is_flag=True, help="Wait until the job ends; exit 0 only if it succeeded.")
@click.option("--dry-run", is_flag=True,
              help="Check it and say what would happen (a compile: cached or about how long), submitting nothing.")
@json_option
def submit(kind: str | None, job_file: Path | None, prompts: tuple[str, ...], prompts_file: Path | None,
           sets: tuple[str, ...], wait: bool, dry_run: bool, as_json: bool, **flags) -> None:
    """Submit a job: KIND and flags, or a job file (-f job.yaml) that mirrors the
    API body, or both."""
    body = _job_file(job_file)
    if kind:
        body["kind"] = kind
    body.update({k: v for k, v in flags.items() if v is not None})
    if prompts:
        body["prompts"] = list(prompts)
    body.update(_parse_set(sets))
    if not body.get("kind"):
        raise click.UsageError("say which kind of job: neurondeck submit compile|finetune|inference")
    api = _api()
    _default_team(api, body)
    if dry_run:
        _dry_run(api.post("/jobs?dry_run=true", body), as_json)
        return
    job = _submit(api, body, prompts_file, quiet=as_json)
    _after_submit(api, job, wait, as_json)


def _dry_run(answer: dict[str, Any], as_json: bool) -> None:
    """The dry run's answer: would it be accepted, and a compile's cache answer with the
    model's cached configurations (to pick one)."""
    if as_json:
        output.emit_json(answer)
        return
    click.echo(f"OK: this {answer['kind']} job would be accepted (nothing was submitted).")
    cache = answer.get("compile_cache")
    if cache:
        click.echo(cache["sentence"])
        for config in cache.get("configurations") or []:
            shape = ", ".join(f"{k} {config[k]}" for k in ("task", "batch_size", "sequence_length", "height", "width",
                                                           "num_images_per_prompt", "tensor_parallel_size")
                              if k in config)
            click.echo(f"  cached: model {config['model_id']} ({config['name']}): {shape}")


def _after_submit(api: Api, job: dict[str, Any], wait: bool, as_json: bool) -> None:
    if not wait:
        if as_json:
            output.emit_json(job)
        else:
            click.echo(f"Submitted job {job['id']} ({job['kind']}, {job['status']}): {api.url}/jobs/{job['id']}/")
        return
    if not as_json:
        click.echo(f"Submitted job {job['id']} ({job['kind']}); waiting for it to end.", err=True)
    _wait_and_exit(api, job["id"], as_json, timeout=None)


@cli.command()
@click.argument("job_id", type=int)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Change a field of the copy.")
@click.option("--wait", is_flag=True, help="Wait until the new job ends.")
@json_option
def clone(job_id: int, sets: tuple[str, ...], wait: bool, as_json: bool) -> None:
    """Submit JOB_ID again, with changes (--set steps=200)."""
    api = _api()
    body = job_body(api.get(f"/jobs/{job_id}"))  # the rule the job page shows too
    body.update(_parse_set(sets))
    _after_submit(api, api.post("/jobs", body), wait, as_json)


# --- follow --------------------------------------------------------------------------

@cli.command(name="list")
@click.option("--team")
@click.option("--status", type=click.Choice(["pending", "queued", "running", "suspended", "succeeded", "failed",
                                            "cancelled"]))
@click.option("--kind", type=click.Choice(["compile", "finetune", "inference"]))
@click.option("--user", help="Only this user's jobs.")
@click.option("--limit", type=click.IntRange(1, 200), default=20, show_default=True)
@json_option
def list_jobs(team, status, kind, user, limit, as_json) -> None:
    """Your teams' jobs, newest first."""
    page = _api().get("/jobs", team=team, status=status, kind=kind, user=user, limit=limit)
    if as_json:
        output.emit_json(page)
        return
    output.table(page["items"], [("ID", "id"), ("TEAM", "team"), ("KIND", "kind"), ("STATUS", "status"),
                                 ("USER", "user"), ("HOST", "host"), ("CORE IDS", "core_range"),
                                 ("CREATED", "created_at"), ("REASON", "reason")])
    if page["count"] > len(page["items"]):
        click.echo(f"({len(page['items'])} of {page['count']}; --limit for more)", err=True)


@cli.command()
@click.argument("job_id", type=int)
@json_option
def status(job_id: int, as_json: bool) -> None:
    """A job's state, placement, result and timeline."""
    job = _api().get(f"/jobs/{job_id}")
    if as_json:
        output.emit_json(job)
        return
    output.job(job)


@cli.command()
@click.argument("job_id", type=int)
@json_option
def pending(job_id: int, as_json: bool) -> None:
    """Why a job waits: the reason, its place in the queue and who is ahead."""
    why = _api().get(f"/jobs/{job_id}/pending")
    if as_json:
        output.emit_json(why)
        return
    output.pending(job_id, why)


@cli.command()
@click.argument("job_id", type=int)
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@json_option
def logs(job_id: int, follow: bool, as_json: bool) -> None:
    """A job's log (-f follows it until the job ends)."""
    api, offset = _api(), 0
    while True:
        window = api.get(f"/jobs/{job_id}/logs", offset=offset)
        if as_json:
            output.emit_json(window)
        else:
            sys.stdout.write(window["text"])
            sys.stdout.flush()
        offset = window["next_offset"]
        if window["finished"] or not follow:
            return
        if not window["text"]:
            time.sleep(POLL_S)


@cli.command()
@click.argument("job_id", type=int)
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 3).")
@json_option
def wait(job_id: int, timeout: float | None, as_json: bool) -> None:
    """Wait for a job to end: exit 0 if it succeeded, 1 if it failed or was
    cancelled, 3 on --timeout. For CI."""
    _wait_and_exit(_api(), job_id, as_json, timeout)


def _wait_and_exit(api: Api, job_id: int, as_json: bool, timeout: float | None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    with output.Progress(f"job {job_id}", quiet=as_json) as progress:
        while True:
            job = api.get(f"/jobs/{job_id}")
            progress.update(job["status"], job.get("reason") or "")
            if job["status"] in FINISHED:
                break
            if deadline is not None and time.monotonic() > deadline:
                progress.update(job["status"], "timed out waiting")
                sys.exit(3)
            time.sleep(POLL_S)
    if as_json:
        output.emit_json(job)
    else:
        click.echo(f"job {job_id} {job['status']}" + (f": {job['failure']}" if job.get("failure") else ""))
    sys.exit(0 if job["status"] == "succeeded" else 1)


@cli.command()
@click.argument("job_id", type=int)
@json_option
def cancel(job_id: int, as_json: bool) -> None:
    """Cancel a job (pending and queued jobs end at once; a running one is stopped)."""
    job = _api().post(f"/jobs/{job_id}/cancel")
    if as_json:
        output.emit_json(job)
    else:
        click.echo(f"job {job_id}: {job['status']}" + (" (stopping)" if job["status"] == "running" else ""))


@cli.command()
@click.argument("job_id", type=int)
@json_option
def suspend(job_id: int, as_json: bool) -> None:
    """Suspend a fine-tune: its cores are freed (a running one saves a checkpoint first)."""
    job = _api().post(f"/jobs/{job_id}/suspend")
    if as_json:
        output.emit_json(job)
    else:
        click.echo(f"job {job_id}: {job['status']}; `neurondeck resume {job_id}` continues from its checkpoint")


@cli.command()
@click.argument("job_id", type=int)
@json_option
def resume(job_id: int, as_json: bool) -> None:
    """Put a suspended fine-tune back in the queue; it continues from its newest checkpoint."""
    job = _api().post(f"/jobs/{job_id}/resume")
    if as_json:
        output.emit_json(job)
    else:
        click.echo(f"job {job_id}: {job['status']} (back in the queue)")


# --- team things ---------------------------------------------------------------------

@cli.command()
@click.option("--team", help="A team's usage (default: your only team).")
@click.option("--from", "first", help="First day, YYYY-MM-DD.")
@click.option("--to", "last", help="Last day, YYYY-MM-DD.")
@click.option("--group-by", type=click.Choice(["kind", "user", "family", "day"]), default="kind", show_default=True)
@json_option
def usage(team, first, last, group_by, as_json) -> None:
    """NeuronCore-hours, cost and budget of a team."""
    api = _api()
    body: dict[str, Any] = {"team": team}
    _default_team_any_role(api, body)
    doc = api.get(f"/teams/{body['team']}/usage", **{"from": first, "to": last, "group_by": group_by})
    if as_json:
        output.emit_json(doc)
        return
    output.usage(doc)


def _default_team_any_role(api: Api, body: dict[str, Any]) -> None:
    if body.get("team"):
        return
    teams = api.get("/teams")
    if len(teams) != 1:
        raise click.UsageError(f"name the team with --team (yours: {', '.join(t['slug'] for t in teams) or 'none'})")
    body["team"] = teams[0]["slug"]


@cli.group(invoke_without_command=True)
@click.option("--team")
@json_option
@click.pass_context
def models(ctx, team, as_json) -> None:
    """Your teams' models (`models upload` adds one)."""
    if ctx.invoked_subcommand is None:
        _list_assets("/models", team, as_json, [("ID", "id"), ("TEAM", "team"), ("NAME", "name"),
                                                 ("VERSION", "version"), ("FORMAT", "format"),
                                                 ("BYTES", "size_bytes"), ("CREATED", "created_at")])


@cli.group(invoke_without_command=True)
@click.option("--team")
@json_option
@click.pass_context
def datasets(ctx, team, as_json) -> None:
    """Your teams' datasets (`datasets upload` adds one)."""
    if ctx.invoked_subcommand is None:
        _list_assets("/datasets", team, as_json, [("ID", "id"), ("TEAM", "team"), ("NAME", "name"),
                                                   ("FORMAT", "format"), ("ROWS", "rows"),
                                                   ("BYTES", "size_bytes"), ("CREATED", "created_at")])


def _list_assets(path: str, team: str | None, as_json: bool, columns) -> None:
    page = _api().get(path, team=team, limit=200)
    if as_json:
        output.emit_json(page)
    else:
        output.table(page["items"], columns)


def _upload_command(path: str, what: str):
    @click.command(name="upload", help=f"Upload a {what} file to a team.")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--name", required=True)
    @click.option("--team")
    @json_option
    def upload(file: Path, name: str, team: str | None, as_json: bool) -> None:
        api = _api()
        body: dict[str, Any] = {"team": team}
        _default_team(api, body)
        doc = api.post_multipart(path, {"team": body["team"], "name": name}, "file", file,
                                 output.upload_progress(as_json))
        if as_json:
            output.emit_json(doc)
        else:
            click.echo(f"Uploaded {what} {doc['name']} as id {doc['id']}.")
    return upload


models.add_command(_upload_command("/models", "model (a zip of a Hugging Face folder)"))
datasets.add_command(_upload_command("/datasets", "dataset (JSONL or CSV)"))


# --- endpoints -------------------------------------------------------------------

@cli.group()
def endpoints() -> None:
    """Inference endpoints: list, create, scale, roll out, delete."""


def _endpoint_line(e: dict[str, Any]) -> str:
    return (f"{e['id']}  {e['team']}/{e['name']}  {e['health']}  rev {e['revision']}  "
            f"{e['desired_replicas']} replicas ({e['min_replicas']}-{e['max_replicas']})  {e['url']}")


def _options(max_batch_size: int | None, max_seq_len: int | None, max_concurrent: int | None) -> dict[str, int]:
    return {k: v for k, v in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len),
                               ("max_concurrent", max_concurrent)) if v is not None}


_option_flags = [click.option("--max-batch-size", type=int), click.option("--max-seq-len", type=int),
                 click.option("--max-concurrent", type=int)]


def _with_options(command):
    for flag in reversed(_option_flags):
        command = flag(command)
    return command


@endpoints.command(name="list")
@click.option("--team")
@json_option
def endpoints_list(team: str | None, as_json: bool) -> None:
    """The team's endpoints with their health and URL."""
    api, body = _api(), {"team": team}
    _default_team_any_role(api, body)
    doc = api.get(f"/teams/{body['team']}/endpoints")
    if as_json:
        output.emit_json(doc)
        return
    output.table(doc["endpoints"], [("ID", "id"), ("NAME", "name"), ("HEALTH", "health"), ("REV", "revision"),
                                    ("WANTED", "desired_replicas"), ("MIN", "min_replicas"), ("MAX", "max_replicas"),
                                    ("URL", "url")])


@endpoints.command(name="create")
@click.argument("name")
@click.option("--model", type=int, required=True, help="Model id (see `neurondeck models`).")
@click.option("--team")
@click.option("--family", type=click.Choice(["inf2", "trn1", "trn2", "cpu"]))
@click.option("--cores", "cores_per_replica", type=int, help="Cores per replica.")
@click.option("--min", "min_replicas", type=int)
@click.option("--max", "max_replicas", type=int)
@_with_options
@json_option
def endpoints_create(name, model, team, family, cores_per_replica, min_replicas, max_replicas, max_batch_size,
                     max_seq_len, max_concurrent, as_json) -> None:
    """Create an endpoint serving MODEL; its replicas start at once."""
    api = _api()
    body: dict[str, Any] = {"team": team}
    _default_team(api, body)
    fields = {"name": name, "model": model, "family": family, "cores_per_replica": cores_per_replica,
              "min_replicas": min_replicas, "max_replicas": max_replicas,
              "options": _options(max_batch_size, max_seq_len, max_concurrent)}
    doc = api.post(f"/teams/{body['team']}/endpoints", {k: v for k, v in fields.items() if v is not None})
    output.emit_json(doc) if as_json else click.echo(_endpoint_line(doc))


@endpoints.command(name="show")
@click.argument("endpoint_id", type=int)
@json_option
def endpoints_show(endpoint_id: int, as_json: bool) -> None:
    """An endpoint, its replicas and its last minute's figures."""
    doc = _api().get(f"/endpoints/{endpoint_id}")
    if as_json:
        output.emit_json(doc)
        return
    click.echo(_endpoint_line(doc))
    stats = doc.get("stats") or {}
    if stats:
        figure = output.figure
        click.echo(f"last minute: {figure(stats['requests_per_s'], 'req/s')}, "
                   f"{figure(stats['tokens_per_s'], 'tokens/s')}, "
                   f"TTFT p50 {figure(stats['ttft_p50_ms'], 'ms')} p95 {figure(stats['ttft_p95_ms'], 'ms')}, "
                   f"{figure(stats['errors'])} errors")
    output.table(doc["replicas"], [("REPLICA", "id"), ("REV", "revision"), ("STATE", "state"), ("HOST", "host"),
                                   ("CORES", "cores"), ("UTIL%", "util_pct"), ("JOB", "job_id")])


@endpoints.command(name="scale")
@click.argument("endpoint_id", type=int)
@click.option("--min", "min_replicas", type=int)
@click.option("--max", "max_replicas", type=int)
@json_option
def endpoints_scale(endpoint_id: int, min_replicas: int | None, max_replicas: int | None, as_json: bool) -> None:
    """Change the replica range (the autoscaler moves within it)."""
    body = {k: v for k, v in (("min_replicas", min_replicas), ("max_replicas", max_replicas)) if v is not None}
    if not body:
        raise click.UsageError("give --min and/or --max")
    doc = _api().patch(f"/endpoints/{endpoint_id}", body)
    output.emit_json(doc) if as_json else click.echo(_endpoint_line(doc))


@endpoints.command(name="rollout")
@click.argument("endpoint_id", type=int)
@click.option("--model", type=int, help="A new model id to serve.")
@click.option("--cores", "cores_per_replica", type=int, help="Cores per replica.")
@_with_options
@json_option
def endpoints_rollout(endpoint_id, model, cores_per_replica, max_batch_size, max_seq_len, max_concurrent,
                      as_json) -> None:
    """Roll out a new model or options: new replicas, traffic moved once they are ready."""
    body: dict[str, Any] = {k: v for k, v in (("model", model), ("cores_per_replica", cores_per_replica))
                            if v is not None}
    if options := _options(max_batch_size, max_seq_len, max_concurrent):
        body["options"] = options
    if not body:
        raise click.UsageError("give --model, --cores or an option to change")
    doc = _api().patch(f"/endpoints/{endpoint_id}", body)
    output.emit_json(doc) if as_json else click.echo(_endpoint_line(doc))


@endpoints.command(name="delete")
@click.argument("endpoint_id", type=int)
@json_option
def endpoints_delete(endpoint_id: int, as_json: bool) -> None:
    """Drain and stop the endpoint's replicas, then delete it."""
    doc = _api().delete(f"/endpoints/{endpoint_id}")
    output.emit_json(doc) if as_json else click.echo(f"Endpoint {doc['name']} is {doc['state']}.")


def main() -> None:
    try:
        cli(standalone_mode=True)
    except ApiError as exc:  # raised outside click's own handling
        click.echo(f"Error: {exc.message}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
