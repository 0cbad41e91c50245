"""The Content-Security-Policy: scripts and styles from the site's own files only (no
'unsafe-inline', no 'unsafe-eval'), on every response; no template carries inline
code for it to refuse; Plotly.js's style sheets are static files that match the
installed Plotly.js; and in a real browser a chart page draws with no violation while
inline code injected into it is refused. tests/test_browser_walk.py checks every page
of the navigation for violations too."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone

from conftest import log_in
from jobs.models import Job, JobMetric
from polling import wait_until

ROOT = Path(__file__).resolve().parent.parent
EMPTY_TEXT_HASH = "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"


def directives(response) -> dict[str, list[str]]:
    header = response["Content-Security-Policy"]
    return {name: values for name, *values in (part.split() for part in header.split(";") if part.strip())}


def assert_strict(response) -> None:
    policy = directives(response)
    assert policy["script-src"] == ["'self'"] and policy["style-src"] == ["'self'"]
    assert policy["default-src"] == ["'self'"] and policy["object-src"] == ["'none'"]
    assert policy["style-src-attr"] == ["'unsafe-hashes'", EMPTY_TEXT_HASH]  # empty style="" only
    assert policy["frame-ancestors"] == ["'none'"] and policy["report-uri"] == ["/csp-report"]
    header = response["Content-Security-Policy"]
    assert "unsafe-inline" not in header and "unsafe-eval" not in header


def test_every_kind_of_response_carries_the_strict_policy(cast, tiny_model):
    anonymous = Client()
    assert_strict(anonymous.get("/login/"))
    assert_strict(anonymous.get("/api/v1/jobs"))  # a 401 in JSON
    bob = Client()
    bob.force_login(cast.bob)
    for path in ("/teams/vision/jobs/", "/teams/vision/jobs/new/inference/", "/fleet/", "/tokens/", "/api/v1/docs",
                 "/api/v1/jobs"):
        response = bob.get(path)
        assert response.status_code == 200, path
        assert_strict(response)
    assert bob.get("/teams/audio/jobs/").status_code == 404
    admin = Client()
    admin.force_login(cast.admin)
    assert_strict(admin.get("/admin/"))


# An executable <script> with code in it (a src-less script that is not a JSON data
# block), an on*= handler attribute, a <style> block, a style="" attribute, a
# javascript: URL.
INLINE = [
    (re.compile(r"<script(?![^>]*\bsrc=)(?![^>]*type=\"application/(?:json|ld\+json)\")[^>]*>", re.I),
     "inline <script>"),
    (re.compile(r"<[a-z][^>]*\son[a-z]+\s*=", re.I), "on*= handler"),
    (re.compile(r"<style\b", re.I), "<style> block"),
    (re.compile(r"<[a-z][^>]*\sstyle\s*=", re.I), "style= attribute"),
    (re.compile(r"javascript:", re.I), "javascript: URL"),
]


def template_files() -> list[Path]:
    dirs = [Path(d) for d in settings.TEMPLATES[0]["DIRS"]] + [ROOT / "jobs" / "templates"]
    return sorted(p for d in dirs if d.exists() for p in d.rglob("*.html"))


def test_no_template_has_inline_script_style_or_handler():
    files = template_files()
    assert len(files) > 30
    found = [f"{path.relative_to(ROOT)}: {what}: {match.group(0)[:80]}"
             for path in files for pattern, what in INLINE for match in pattern.finditer(path.read_text())]
    assert not found, ("Inline code is refused by the Content-Security-Policy: move it to a static file "
                       "(see ARCHITECTURE.md):\n" + "\n".join(found))


def test_the_scan_finds_each_kind_of_inline_code():
    samples = ['<script>alert(1)</script>', '<select onchange="go()">', '<style>p {}</style>',
               '<span style="--depth: 2">', '<a href="javascript:go()">']
    for sample, (pattern, what) in zip(samples, INLINE):
        assert pattern.search(sample), what
    for allowed in ('<script src="/static/x.js" defer></script>', '{{ data|json_script:"x" }}',
                    '<script type="application/json" id="x">{}</script>', '<span class="tree" data-depth="2">'):
        assert not any(pattern.search(allowed) for pattern, _ in INLINE), allowed


@pytest.mark.browser
def test_the_plotly_style_sheets_match_the_installed_plotly(browser):
    from jobs.management.commands.plotly_css import generated_files

    stale = [str(path.relative_to(ROOT)) for path, text in generated_files(browser).items()
             if not path.exists() or path.read_text() != text]
    assert not stale, f"run `manage.py plotly_css` after upgrading plotly; stale: {stale}"


REPORT_CSP = """window.cspViolations = [];
document.addEventListener('securitypolicyviolation', e => window.cspViolations.push(
    e.effectiveDirective + ' ' + (e.blockedURI || 'inline') + ' ' + (e.sample || '')));"""


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_a_chart_page_draws_under_the_policy_and_injected_inline_code_is_refused(cast, tiny_model, live_server,
                                                                                  browser, caplog):
    now = timezone.now()
    job = Job.objects.create(team=cast.vision, user=cast.bob, kind="finetune", status=Job.Status.SUCCEEDED,
                             model=tiny_model, spec={"steps": 3}, created_at=now, finished_at=now,
                             result={"steps": 3, "first_loss": 5.0, "final_loss": 4.0})
    JobMetric.objects.bulk_create([JobMetric(job=job, step=s, name="loss", value=6 - s) for s in (1, 2, 3)])
    page = log_in(browser, live_server.url, "bob")
    page.add_init_script(REPORT_CSP)
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    # Wait for the event itself, the chart drawn, not for the page's load event (the
    # page's deadline is the shared polling.DEADLINE_S).
    page.goto(f"{live_server.url}/jobs/{job.pk}/", wait_until="commit")
    page.locator(".js-plotly-plot .main-svg").first.wait_for()
    page.hover(".js-plotly-plot")  # the mode bar shows on hover
    # Plotly.js's own rules came from the static sheet: the mode bar is placed by them.
    assert page.evaluate("getComputedStyle(document.querySelector('.modebar-container')).position") == "absolute"
    assert page.evaluate("document.querySelectorAll('style').length") == 0
    assert page.evaluate("window.cspViolations") == [] and errors == []

    # What an injected script or style would try is refused and reported.
    page.evaluate("""() => {
        const script = document.createElement('script');
        script.textContent = 'window.injected = true';
        document.body.appendChild(script);
        const style = document.createElement('style');
        style.textContent = 'body { background: red }';
        document.head.appendChild(style);
        document.body.setAttribute('style', 'color: red');
        document.body.setAttribute('onclick', 'window.injected = true');
        document.body.click();
    }""")
    page.wait_for_function("() => window.cspViolations.length >= 4")
    violations = page.evaluate("window.cspViolations")
    assert page.evaluate("window.injected === undefined")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") != "rgb(255, 0, 0)"
    for directive in ("script-src-elem", "style-src-elem", "style-src-attr", "script-src-attr"):
        assert any(v.startswith(directive) for v in violations), (directive, violations)
    # ... and the browser reported it to the site, which logged it.
    wait_until(lambda: [r.getMessage() for r in caplog.records if r.name == "jobs.csp"], message="a logged CSP report")
    page.context.close()


def report(client: Client, body: str, **extra):
    return client.generic("POST", "/csp-report", body, content_type="application/csp-report", **extra)


def test_a_violation_report_is_logged_and_anything_else_is_refused_without_a_5xx(db, caplog):
    client = Client(enforce_csrf_checks=True)  # browsers send no CSRF token
    sample = {"csp-report": {"document-uri": "https://nd.example/fleet/", "effective-directive": "script-src-elem",
                             "blocked-uri": "inline", "source-file": "https://nd.example/fleet/",
                             "line-number": 12, "script-sample": "alert(1)\n" + "x" * 1000}}
    assert report(client, json.dumps(sample)).status_code == 204
    [logged] = [r.getMessage() for r in caplog.records if r.name == "jobs.csp"]
    assert "script-src-elem refused inline on https://nd.example/fleet/ (https://nd.example/fleet/:12)" in logged
    assert len(logged) < 1200 and "\n" not in logged
    for bad in ("", "not json", "[" * 10000, '{"csp-report": "x"}', '{"csp-report": {"a": "\u0000"}}', "[]"):
        assert report(client, bad).status_code == 400, bad
    assert report(client, "x" * 20000).status_code == 413
    assert client.get("/csp-report").status_code == 405
