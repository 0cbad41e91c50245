"""No 5xx on any input (issue #14), as a property.

Every API operation in the OpenAPI schema (read from /api/v1/openapi.json) that takes
parameters or a body, and every HTML form that posts (found by reading the pages'
<form method="post">), gets generated requests: wrong types, unicode with NUL and
lone surrogates, huge and deeply nested values, bodies that are not what their
content type says, content types that are not what the operation takes. Each
request must:

- never answer 5xx;
- answer a 4xx from the API as JSON with a `detail`, and, when one field of an
  otherwise valid body or one parameter was made hostile and the answer is a
  validation error, name that field;
- create no row (any table of the app, users and sessions) and no file (under
  STORAGE_ROOT) when it is refused.

Kept modest for a 2-core suite: ~30 examples per operation or form, no deadline.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import re
import zipfile
from datetime import date, timedelta
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
from django.apps import apps
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.api.root import api
from jobs.assets import storage
from jobs.models import Artifact, Job
from tests.conftest import api_client
from tests.endpoint_support import create as create_endpoint

EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "30"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])
DEEP = "\x01DEEP\x01"  # stands for a value nested thousands of levels deep (json.dumps cannot write one)
VALIDATION_CODES = {"invalid", "invalid_json", None}


# --- the operations, from the schema ----------------------------------------------------

def _operations() -> list[tuple[str, str]]:
    """(METHOD, path) of every operation that takes parameters or a body. The ids are
    read from ninja's schema at collection; each test reads the document the server
    serves at /api/v1/openapi.json and takes the operation from there."""
    schema = api.get_openapi_schema(path_prefix="/api/v1/")
    found = []
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            if op.get("parameters") or op.get("requestBody"):
                found.append((method.upper(), path))
    return found


OPERATIONS = _operations()


@pytest.fixture
def served_schema(world) -> dict:
    response = world.api.get("/api/v1/openapi.json")
    assert response.status_code == 200
    return response.json()


# --- the world each request meets ---------------------------------------------------------

@pytest.fixture
def world(cast, tiny_model, dataset, cpu_host, tiny_model_dir):
    pending = Job.objects.create(team=cast.vision, user=cast.bob, kind="inference", model=tiny_model,
                                 spec={"prompts": ["hi"], "max_new_tokens": 4})
    done = Job.objects.create(team=cast.vision, user=cast.bob, kind="inference", model=tiny_model,
                              status=Job.Status.SUCCEEDED, spec={"prompts": ["hi"]})
    out = storage.job_dir(done.pk) / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    (out / "outputs.jsonl").write_text('{"output": "hi"}\n')
    Artifact.objects.create(job=done, name="outputs.jsonl", path=storage.rel_path(out / "outputs.jsonl"), size_bytes=17)
    admin_page = Client()
    admin_page.force_login(cast.admin)
    endpoint = create_endpoint(cast.vision, cast.bob, model=tiny_model, name="world", min_replicas=0)
    return type("World", (), {
        "cast": cast, "model": tiny_model, "dataset": dataset, "host": cpu_host, "pending": pending, "done": done,
        "endpoint": endpoint, "api": api_client(cast.admin), "page": admin_page,
        "model_zip": _zip_folder(tiny_model_dir),
    })


def _zip_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"m/{path.relative_to(folder).as_posix()}")
    return buffer.getvalue()


# Rows written about a request rather than from it: the audit log (token use, failed
# logins) records refused requests on purpose.
RECORDS_REQUESTS = {"AuditEntry"}


def _rows() -> tuple[int, ...]:
    """Row counts of every table a request could add to, in one query."""
    models = [*(m for m in apps.get_app_config("jobs").get_models() if m.__name__ not in RECORDS_REQUESTS),
              apps.get_model("auth", "User"), apps.get_model("sessions", "Session")]
    quote_name = connection.ops.quote_name
    sql = "SELECT " + ", ".join(f"(SELECT COUNT(*) FROM {quote_name(m._meta.db_table)})" for m in models)
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return tuple(cursor.fetchone())


def _files() -> set[tuple[str, int]]:
    found = set()
    for folder, _dirs, names in os.walk(storage.root()):
        for name in names:
            path = os.path.join(folder, name)
            try:
                found.add((path, os.path.getsize(path)))
            except OSError:
                pass
    return found


class Snapshot:
    def __init__(self):
        self.rows, self.files = _rows(), _files()

    def assert_unchanged(self, what: str) -> None:
        assert _rows() == self.rows, f"{what}: refused, but rows were added"
        assert _files() == self.files, f"{what}: refused, but files were left behind"


# --- hostile values -------------------------------------------------------------------------

SPECIAL_TEXT = ["\x00", "a\x00b", "\ud800", "x\udfff", "\u202e", "\uffff", "\U0001f4a5", "'; DROP TABLE x;--",
                "../../etc/passwd", "%00", "\\u0000", "", " ", "1", "1.5", "true", "null", "-1", "9" * 40, "1e999",
                "NaN", "<script>", "vision\x00", "inf2", "cpu"]


def texts(*, surrogates: bool = True, max_size: int = 40) -> st.SearchStrategy[str]:
    alphabet = st.characters(codec=None, exclude_categories=() if surrogates else ("Cs",))
    return st.one_of(st.sampled_from([t for t in SPECIAL_TEXT if surrogates or not re.search("[\ud800-\udfff]", t)]),
                     st.text(st.one_of(alphabet, st.sampled_from(["\x00", "\n", "\r"])), max_size=max_size))


def json_values(*, surrogates: bool = True) -> st.SearchStrategy:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(2**80), 2**80),
                        st.sampled_from([0, -1, 2**63, 2**64 + 1, 10**30]),
                        st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1.0, 1.5, -0.0, 1e300]),
                        texts(surrogates=surrogates), st.just("x" * 100_000), st.just(DEEP))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(texts(surrogates=surrogates), inner, max_size=4)), max_leaves=8)


def dump_json(value, depth: int) -> bytes:
    """JSON text of `value` (lone surrogates as \\udxxx escapes), DEEP replaced by a
    list nested `depth` levels."""
    text = json.dumps(value, ensure_ascii=True)
    return text.replace(json.dumps(DEEP), "[" * depth + "]" * depth).encode()


def url_text(value) -> str:
    return quote(str(value), safe="", errors="surrogatepass")


# --- the API --------------------------------------------------------------------------------

def valid_path_params(world, path: str) -> dict[str, str]:
    """A value for each {parameter} of `path`: the world's objects, else 1."""
    job = world.done.pk if "artifacts" in path else world.pending.pk
    known = {"job_id": job, "model_id": world.model.pk, "dataset_id": world.dataset.pk, "slug": "vision",
             "endpoint_id": world.endpoint.pk,
             "name": "outputs.jsonl" if "artifacts" in path else world.host.name}
    return {name: known.get(name, 1) for name in re.findall(r"{(\w+)}", path)}


VALID_QUERY = {"team": "vision", "status": "pending", "kind": "inference", "user": "bob", "limit": 10, "offset": 0,
               "name": "tiny-gpt", "since": "0-0", "family": "cpu", "group_by": "kind", "max_bytes": 100,
               "from": (date.today() - timedelta(days=10)).isoformat(), "to": date.today().isoformat()}
# A value of one of these can make the other one wrong (a range too long, an inference
# field on a compile job): the error may name the other.
COUPLED = {"from": {"to"}, "to": {"from"}}


ENDPOINT_NAMES = itertools.count()


def json_body_base(world, path: str, schema: dict | None = None, components: dict | None = None) -> dict:
    """A valid body: written out for the operations whose bodies need real objects,
    else made from the operation's schema (its required properties)."""
    if path == "/api/v1/jobs":
        return {"team": "vision", "kind": "inference", "family": "cpu", "cores": 1, "model": world.model.pk,
                "prompts": ["hello"], "max_new_tokens": 4, "temperature": 0}
    if path.endswith("/endpoints"):
        # a fresh name each time: an example that is accepted must not make the next one a duplicate
        return {"name": f"chat-{next(ENDPOINT_NAMES)}", "model": world.model.pk, "min_replicas": 0, "max_replicas": 1}
    if path.endswith("/quota"):
        return {"max_pending": 50, "families": {"cpu": {"borrow_limit": 8}}}
    value = schema_example(schema or {}, components or {})
    return value if isinstance(value, dict) else {}


def schema_example(schema: dict, components: dict, depth: int = 0):
    """A value of a JSON schema: its example or default, else one of its type."""
    if "$ref" in schema:
        schema = components.get(schema["$ref"].rsplit("/", 1)[-1], {})
    for key in ("example", "default"):
        if key in schema:
            return schema[key]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = [s for s in schema.get(key, []) if s.get("type") != "null"]
        if options:
            return schema_example(options[0], components, depth + 1)
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        required = set(schema.get("required", []))
        return {name: schema_example(sub, components, depth + 1) for name, sub in schema.get("properties", {}).items()
                if name in required and depth < 5}
    return {"integer": 1, "number": 1.0, "boolean": True, "array": [], "string": "vision"}.get(kind, "vision")


OTHER_CONTENT_TYPES = ["text/plain", "application/xml", "application/octet-stream", "application/x-www-form-urlencoded",
                       "multipart/form-data", "application/json; charset=utf-16", "", "application/merge-patch+json",
                       "image/png", "application/json, text/plain"]
RAW_BODIES = [b"", b"null", b"[]", b"{}", b'"text"', b"42", b"{", b"\xff\xfe{}", b'{"team": "\xff"}',
              '{"team": "vision"}'.encode("utf-16"), b"[" * 100_000, b'{"a":' * 30_000, b"\x00" * 10,
              b'{"team": "vision", "kind": "inference", "prompts": ["\\ud800"]}', b"NaN", b"1e999",
              b'{"team": "vision", "team": "audio"}']


def request_strategy(op: dict, path: str, body_types: list[str]):
    """(mutated field or None, path params, query params, body kind, body, content type)."""
    param_names = [p["name"] for p in op.get("parameters", [])]
    properties = []
    if "application/json" in body_types:
        properties = list(op["requestBody"]["content"]["application/json"]["schema"].get("properties", {}))
    elif "multipart/form-data" in body_types:
        properties = list(op["requestBody"]["content"]["multipart/form-data"]["schema"].get("properties", {}))
    one_param = st.tuples(st.sampled_from(param_names), st.one_of(texts(), st.integers(-(2**80), 2**80)))
    choices = []
    if param_names:
        choices.append(st.tuples(st.just("param"), one_param))
    if "application/json" in body_types:
        fields = st.sampled_from([*properties, "unknown_field", "csrfmiddlewaretoken"])
        choices += [
            st.tuples(st.just("json_field"), st.tuples(fields, json_values())),
            st.tuples(st.just("json_any"), json_values()),
            st.tuples(st.just("raw"), st.tuples(st.sampled_from(RAW_BODIES), st.sampled_from(
                ["application/json", *OTHER_CONTENT_TYPES]))),
            st.tuples(st.just("content_type"), st.sampled_from(OTHER_CONTENT_TYPES)),
        ]
    if "multipart/form-data" in body_types:
        fields = st.sampled_from([p for p in properties if p not in ("file", "prompts_file")] or ["team"])
        choices += [
            st.tuples(st.just("form_field"), st.tuples(fields, texts(surrogates=False, max_size=200))),
            st.tuples(st.just("form_file"), st.sampled_from(FILE_KINDS)),
        ]
    if not choices:
        choices.append(st.tuples(st.just("none"), st.none()))
    return st.tuples(st.one_of(choices), st.integers(100, 60_000))


def _member(data: dict, name: str, payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for key, value in data.items():
            archive.writestr(key, value)
        if name:
            archive.writestr(name, payload)
    return buffer.getvalue()


def _symlink_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("m/config.json", '{"model_type": "gpt2"}')
        archive.writestr("m/model.safetensors", b"x")
        link = zipfile.ZipInfo("m/evil")
        link.external_attr = (0o120777 << 16)
        archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


def _bomb_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("m/config.json", '{"model_type": "gpt2"}')
        archive.writestr("m/model.safetensors", b"\0" * (20 << 20))  # 20 MiB of zeros: a few KiB compressed
    return buffer.getvalue()


def _corrupt(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


FILE_KINDS = ["valid", "corrupt", "truncated", "traversal", "symlink", "bomb", "not_zip", "empty_zip", "nul_dataset",
              "deep_dataset", "surrogate_dataset", "csv", "binary", "deep_config"]


def file_bytes(kind: str, world) -> tuple[str, bytes]:
    if kind == "valid":
        return "m.zip", world.model_zip
    if kind == "corrupt":
        return "m.zip", _corrupt(world.model_zip)
    if kind == "truncated":
        return "m.zip", world.model_zip[: len(world.model_zip) * 2 // 3]
    if kind == "traversal":
        return "m.zip", _member({"m/config.json": '{"model_type": "gpt2"}'}, "m/../../../escape.txt", b"x")
    if kind == "symlink":
        return "m.zip", _symlink_zip()
    if kind == "bomb":
        return "m.zip", _bomb_zip()
    if kind == "not_zip":
        return "m.zip", b"PK\x03\x04 definitely not a zip"
    if kind == "empty_zip":
        return "m.zip", _member({}, "", b"")
    if kind == "nul_dataset":
        return "d.jsonl", b'{"text": "a\x00b"}\n'
    if kind == "deep_dataset":
        return "d.jsonl", b'{"text": "a", "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}\n"
    if kind == "surrogate_dataset":
        return "d.jsonl", b'{"text": "\\ud800"}\n'
    if kind == "csv":
        return "d.csv", b"text\nhello\n\"unterminated\n"
    if kind == "deep_config":
        return "m.zip", _member({"m/model.safetensors": "x"}, "m/config.json",
                                b'{"model_type": "gpt2", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    return "blob.bin", bytes(range(256)) * 8


def multipart_base(world, path: str) -> dict:
    if path == "/api/v1/jobs":
        return {"team": "vision", "kind": "inference", "family": "cpu", "cores": "1", "model": str(world.model.pk),
                "prompts": "hello", "max_new_tokens": "4", "temperature": "0"}
    if path == "/api/v1/models":
        return {"team": "vision", "name": "upload", "file": SimpleUploadedFile("m.zip", world.model_zip)}
    return {"team": "vision", "name": "upload", "file": SimpleUploadedFile("d.jsonl", b'{"text": "a"}\n')}


def named(body: dict, field: str) -> bool:
    fields = {str(f).split(".")[0] for f in {*(body.get("errors") or {}), body.get("field")} if f}
    return field in fields or bool(fields & COUPLED.get(field, set()))


SWEEP_JSON = [True, 1.5, "1", "a\x00b", "\ud800", DEEP, None, [], {"x": 1}, 2**64, -1, "x" * 100_000]
SWEEP_TEXT = ["a\x00b", "9" * 30, "-1", "1.5", "", "x" * 5000, "\u202e<script>"]


def sweep_cases(op: dict, body_types: list[str]):
    """Each parameter and each body field with each classic hostile value, each raw
    body and each wrong content type: the systematic part, before hypothesis roams."""
    for param in op.get("parameters", []):
        for value in [*SWEEP_TEXT, "\ud800", 2**70]:
            yield "param", (param["name"], value)
    if "application/json" in body_types:
        for field in [*op["requestBody"]["content"]["application/json"]["schema"].get("properties", {}), "unknown"]:
            for value in SWEEP_JSON:
                yield "json_field", (field, value)
        for raw in RAW_BODIES:
            yield "raw", (raw, "application/json")
        for content_type in OTHER_CONTENT_TYPES:
            yield "content_type", content_type
    if "multipart/form-data" in body_types:
        for field in op["requestBody"]["content"]["multipart/form-data"]["schema"].get("properties", {}):
            if field not in ("file", "prompts_file"):
                for value in SWEEP_TEXT:
                    yield "form_field", (field, value)
        for kind in FILE_KINDS:
            yield "form_file", kind


def api_case(world, op: dict, method: str, path: str, body_types: list[str], kind: str, value, depth: int) -> None:
    """Send one request built from the operation's valid base with one thing made
    hostile, and check the answer (see the module doc)."""
    json_schema = (op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema")
    base = json_body_base(world, path, json_schema, world.components)
    params = valid_path_params(world, path)
    query: dict = {p["name"]: VALID_QUERY[p["name"]] for p in op.get("parameters", [])
                   if p["in"] == "query" and p["name"] in VALID_QUERY}
    at_fault: str | None = None
    data, content_type, multipart = None, None, None
    if "application/json" in body_types:
        data, content_type = dump_json(base, depth), "application/json"
    elif body_types:
        multipart = multipart_base(world, path)
    if kind == "param":
        name, bad = value
        at_fault = name
        if name in params:
            params[name] = bad
        else:
            query[name] = bad
    elif kind == "json_field":
        field, bad = value
        body = dict(base)
        body[field] = bad
        data, at_fault = dump_json(body, depth), field
    elif kind == "json_any":
        data = dump_json(value, depth)
    elif kind == "raw":
        data, content_type = value
    elif kind == "content_type":
        content_type = value
    elif kind == "form_field":
        field, bad = value
        multipart, data = multipart_base(world, path), None
        multipart[field] = bad
        at_fault = field
    elif kind == "form_file":
        filename, payload = file_bytes(value, world)
        multipart, data = multipart_base(world, path), None
        key = "file" if "file" in multipart else "prompts_file"
        multipart[key] = SimpleUploadedFile(filename, payload)
    url = path
    for name, param in params.items():
        url = url.replace("{" + name + "}", url_text(param))
    if query:
        url += "?" + "&".join(f"{url_text(k)}={url_text(v)}" for k, v in query.items())

    before = Snapshot()
    if multipart is not None:
        response = world.api.generic(method, url) if method != "POST" else world.api.post(url, data=multipart)
    else:
        response = world.api.generic(method, url, data=data or b"", content_type=content_type or "")
    what = f"{method} {url[:200]} [{kind}: {str(value)[:200]!r}]"
    assert response.status_code < 500, f"{what} -> {response.status_code} {response.content[:500]!r}"
    if response.status_code >= 400:
        assert response["Content-Type"].startswith("application/json"), f"{what}: {response.content[:300]!r}"
        body = response.json()
        assert isinstance(body.get("detail"), str) and body["detail"], f"{what}: {body}"
        if at_fault and response.status_code in (400, 422) and body.get("code") in VALIDATION_CODES:
            assert named(body, at_fault), f"{what}: the error does not name {at_fault}: {body}"
        before.assert_unchanged(what)


@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_api_operation_answers_5xx_to_hostile_input(world, served_schema, method, path):
    op = served_schema["paths"][path][method.lower()]
    world.components = served_schema.get("components", {}).get("schemas", {})
    body_types = list((op.get("requestBody") or {}).get("content", {}))
    for kind, value in sweep_cases(op, body_types):
        api_case(world, op, method, path, body_types, kind, value, 50_000)

    @PROPERTY
    @given(request_strategy(op, path, body_types))
    def hostile_request(case):
        (kind, value), depth = case
        api_case(world, op, method, path, body_types, kind, value, depth)

    hostile_request()


# --- the HTML forms -------------------------------------------------------------------------

class _Forms(HTMLParser):
    """<form method="post"> elements of a page: action, enctype and their fields."""

    def __init__(self, url: str):
        super().__init__()
        self.url, self.forms, self.current, self.select = url, [], None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form" and (attrs.get("method") or "get").lower() == "post":
            self.current = {"action": attrs.get("action") or self.url, "enctype": attrs.get("enctype", ""), "fields": {}}
            self.forms.append(self.current)
        elif self.current is not None and tag in ("input", "textarea", "select") and attrs.get("name"):
            name = attrs["name"]
            kind = attrs.get("type", tag) if tag == "input" else tag
            field = self.current["fields"].setdefault(name, {"type": kind, "values": [], "chosen": []})
            if attrs.get("value") is not None:
                field["values"].append(attrs["value"])
                if "checked" in attrs or kind not in ("radio", "checkbox"):
                    field["chosen"].append(attrs["value"])
            if tag == "select":
                self.select = field
        elif tag == "option" and self.select is not None and attrs.get("value") is not None:
            self.select["values"].append(attrs["value"])
            if "selected" in attrs:
                self.select["chosen"].append(attrs["value"])

    def handle_endtag(self, tag):
        if tag == "form":
            self.current = None
        elif tag == "select":
            self.select = None


SIGNED_IN_PAGES = ["/", "/teams/vision/", "/teams/vision/jobs/", "/teams/vision/models/", "/teams/vision/datasets/",
                   "/tokens/", "/quotas/", "/usage/", "/teams/vision/usage/", "/teams/new/", "/teams/vision/endpoints/",
                   "/teams/vision/notifications/", "/teams/vision/compile-cache/",
                   *(f"/teams/vision/jobs/new/{kind}/" for kind in ("inference", "compile", "finetune"))]


def page_forms(client: Client, world) -> list[dict]:
    """Every form that posts on the pages a staff user sees (and the login page, posted
    signed out), each with the client to post it with."""
    found: dict[str, dict] = {}
    pages = [(client, url) for url in [*SIGNED_IN_PAGES, f"/hosts/{world.host.name}/", f"/jobs/{world.pending.pk}/",
                                       f"/endpoints/{world.endpoint.pk}/"]]
    for poster, url in [*pages, (Client(), "/login/")]:
        response = poster.get(url)
        if response.status_code != 200:
            continue
        parser = _Forms(url)
        parser.feed(response.content.decode())
        for form in parser.forms:
            if "logout" in form["action"]:
                continue  # it would end the session the other forms post in
            form["fields"].pop("csrfmiddlewaretoken", None)
            form["client"] = poster
            found.setdefault(form["action"], form)
    return list(found.values())


# Values that make each form's untouched fields valid (what a user would type), so a
# hostile value in one field meets code past the form's validation.
SEED = {"prompts": "hello", "name": "upload", "steps": "5", "username": "charlie", "slug": "new-team",
        "instance_type": "inf2.xlarge", "usd_per_hour": "0.76", "manager": "alice", "time_zone": "UTC"}


def base_data(form: dict, world) -> dict:
    data = {}
    for name, field in form["fields"].items():
        if field["type"] == "file":
            if name == "file":
                kind = "dataset" if "datasets" in form["action"] else "valid"
                data[name] = SimpleUploadedFile("d.jsonl", b'{"text": "a"}\n') if kind == "dataset" \
                    else _form_value(field, "valid", world)
        elif name in SEED:
            data[name] = SEED[name]
        elif field["values"]:
            data[name] = _default(field)
    return data


def _default(field: dict):
    """What the page would send for a field left as it is (a select with nothing
    chosen: its first real option)."""
    if field["type"] == "checkbox":
        return field["chosen"]
    if field["chosen"]:
        return field["chosen"][-1]
    return next((v for v in field["values"] if v), field["values"][0])


def _form_value(field: dict, bad, world):
    if field["type"] == "file":
        filename, payload = file_bytes(bad if bad in FILE_KINDS else "binary", world)
        return SimpleUploadedFile(filename, payload)
    return bad


def test_the_forms_are_found(world):
    forms = page_forms(world.page, world)
    assert len(forms) <= len(FORM_SLOTS), f"{len(forms)} forms: raise FORM_SLOTS so that none goes unposted"
    actions = {form["action"] for form in forms}
    for expected in ("/teams/vision/models/", "/teams/vision/datasets/", "/tokens/", "/login/", "/quotas/vision/",
                     "/teams/vision/jobs/new/inference/", f"/jobs/{world.pending.pk}/cancel/",
                     f"/hosts/{world.host.name}/drain/", "/teams/vision/endpoints/",
                     f"/endpoints/{world.endpoint.pk}/", f"/endpoints/{world.endpoint.pk}/delete/",
                     "/teams/vision/notifications/subscribe/", "/teams/vision/notifications/policy/"):
        assert any(a.startswith(expected) for a in actions), (expected, actions)


FORM_SLOTS = list(range(24))  # forms are found at run time; a slot takes the n-th (none: skipped)


FORM_VALUES = st.one_of(texts(surrogates=False, max_size=300), st.sampled_from(FILE_KINDS),
                        st.sampled_from(["9" * 30, "-1", "1.5", "1e999", "NaN", "0", "x" * 5000]))


@pytest.mark.parametrize("slot", FORM_SLOTS)
def test_no_form_post_answers_5xx_to_hostile_input(world, slot):
    forms = sorted(page_forms(world.page, world), key=lambda f: f["action"])
    if slot >= len(forms):
        pytest.skip(f"only {len(forms)} forms")
    form = forms[slot]
    names = sorted(form["fields"]) or ["unknown_field"]
    one_field = st.tuples(st.sampled_from(names), FORM_VALUES).map(lambda pair: ({pair[0]: pair[1]}, False))
    several = st.tuples(st.dictionaries(st.sampled_from(names), FORM_VALUES, max_size=3), st.booleans())

    for name in names:
        field = form["fields"].get(name, {"type": "text"})
        for value in FILE_KINDS if field["type"] == "file" else SWEEP_TEXT:
            form_case(world, form, {name: value}, False)

    @PROPERTY
    @given(st.one_of(one_field, one_field, several))
    def hostile_post(case):
        changes, drop_others = case
        form_case(world, form, changes, drop_others)

    hostile_post()


RECORDS_REFUSALS = {"/login/"}  # a failed login is recorded on purpose (throttling, the audit log)


def form_case(world, form: dict, changes: dict, drop_others: bool) -> None:
    """Post the form as a user would fill it in, `changes` made hostile (or only them)."""
    data = {} if drop_others else base_data(form, world)
    for name, value in changes.items():
        field = form["fields"].get(name, {"type": "text"})
        data[name] = _form_value(field, value, world)
    before = Snapshot()
    response = form["client"].post(form["action"], data=data)
    what = f"POST {form['action']} {dict((k, str(v)[:80]) for k, v in data.items())}"
    assert response.status_code < 500, f"{what} -> {response.status_code}"
    html = response.content.decode(errors="replace")
    refused = response.status_code >= 400 or (response.status_code == 200 and "errorlist" in html)
    if refused and form["action"] not in RECORDS_REFUSALS:
        before.assert_unchanged(what)
    if response.status_code == 400 and not drop_others and len(changes) == 1:
        (field,) = changes
        assert f"id_{field}_error" in html or "errorlist nonfield" in html or field in html, \
            f"{what}: the 400 does not name {field}"
