"""A job as the API body that submits it again, and that body as a `neurondeck submit`
command, a job file (YAML) and a curl call.

`job_body` is the one rule for "submit this job again": `neurondeck clone` uses it on
the API's job document and the job page on the Job row (through the same keys), so
the command, the file and the curl call a page shows submit the same spec. Django-free:
the command-line client installs alone."""
from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from typing import Any

import yaml

# What the server adds to a spec itself: not a field of the submit body.
DERIVED_SPEC_KEYS = frozenset({"compile_key"})
# Spec keys that hold an object's id; the body names the object without "_id".
ID_KEYS = {"model_id": "model", "dataset_id": "dataset"}
FIRST = ("model", "dataset", "prompts")
# Body fields that `neurondeck submit` has a flag of its own for (others go in --set).
FLAGS = {"team": "--team", "family": "--family", "cores": "--cores", "host_count": "--hosts",
         "same_network": "--same-network", "max_runtime_s": "--max-runtime",
         "model": "--model", "dataset": "--dataset", "max_new_tokens": "--max-new-tokens",
         "temperature": "--temperature", "steps": "--steps", "epochs": "--epochs",
         "learning_rate": "--learning-rate", "seed": "--seed", "batch_size": "--batch-size",
         "sequence_length": "--sequence-length", "compiler_options": "--compiler-options"}


def job_body(job: Mapping[str, Any]) -> dict[str, Any]:
    """The API body that submits `job` again: its team, kind, placement and spec.

    `job` has the API document's keys: team (slug), kind, family, cores,
    max_runtime_s, spec. Values left out of a spec (None) are left out of the body;
    compiler options (a list in the spec) are the string the form reads."""
    body: dict[str, Any] = {"team": job["team"], "kind": job["kind"], "family": job["family"],
                            "cores": job["cores"]}
    if job.get("max_runtime_s") is not None:
        body["max_runtime_s"] = job["max_runtime_s"]
    if (job.get("host_count") or 1) > 1:
        body["host_count"] = job["host_count"]
        body["same_network"] = bool(job.get("same_network"))
    spec: dict[str, Any] = {}
    for key, value in (job.get("spec") or {}).items():
        if key in DERIVED_SPEC_KEYS or value is None:
            continue
        key = ID_KEYS.get(key, key)
        if key == "compiler_options" and isinstance(value, list):
            value = " ".join(value)
            if not value:
                continue
        spec[key] = value
    # what the job works on first (PostgreSQL returns a spec's keys in its own order)
    for key in sorted(spec, key=lambda k: (FIRST.index(k) if k in FIRST else len(FIRST), k)):
        body[key] = spec[key]
    return body


def _yaml_scalar(value: Any) -> str:
    """`value` as YAML that `--set key=...` reads back as the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1 << 20).strip()
    return text.removesuffix("...").strip()


def submit_command(body: Mapping[str, Any]) -> str:
    """`neurondeck submit KIND ...` with the body's fields as flags (--set for the rest)."""
    words = ["neurondeck", "submit", body["kind"]]
    for key, value in body.items():
        if key == "kind":
            continue
        if key == "prompts":
            for prompt in (value if isinstance(value, list) else str(value).splitlines()):
                words += ["--prompt", prompt]
        elif key in FLAGS and not isinstance(value, (list, dict, bool)):
            words += [FLAGS[key], repr(value) if isinstance(value, float) else str(value)]
        else:
            words += ["--set", f"{key}={_yaml_scalar(value)}"]
    return " ".join(shlex.quote(word) for word in words)


def job_file(body: Mapping[str, Any]) -> str:
    """The body as a job file for `neurondeck submit -f`."""
    return yaml.safe_dump(dict(body), sort_keys=False, allow_unicode=True, width=100)


def curl_command(body: Mapping[str, Any], jobs_url: str) -> str:
    """A curl call that POSTs the body to the API's /jobs (the token from $NEURONDECK_TOKEN)."""
    data = json.dumps(dict(body), ensure_ascii=False, separators=(", ", ": "))
    return (f'curl -H "Authorization: Bearer $NEURONDECK_TOKEN" -H \'Content-Type: application/json\' '
            f"-d {shlex.quote(data)} {shlex.quote(jobs_url)}")
