"""/csp-report: where browsers send the Content-Security-Policy's violation reports
(the policy's report-uri). Each is logged as a warning (logger jobs.csp) with the
directive, what was blocked and where, so inline code that reached a page in
production shows up in the web app's log. Bodies are capped and parsed with the one
parser for outside JSON; anything else is answered 400, never 5xx. CSRF-exempt: the
browser posts it without a token, and it changes nothing but the log."""
from __future__ import annotations

import logging

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from jobs import safe_json

log = logging.getLogger("jobs.csp")
MAX_BYTES = 16 * 1024
FIELD_CHARS = 300  # each logged value is cut here: the report's text comes from outside


@csrf_exempt
@require_POST
def csp_report(request: HttpRequest) -> HttpResponse:
    if int(request.META.get("CONTENT_LENGTH") or 0) > MAX_BYTES:
        return HttpResponse("report too large", status=413, content_type="text/plain")
    try:
        report = safe_json.loads(request.body).get("csp-report")
    except (safe_json.JSONInputError, AttributeError):
        report = None
    if not isinstance(report, dict):
        return HttpResponse('a CSP report is JSON {"csp-report": {...}}', status=400, content_type="text/plain")
    fields = {name: str(report.get(name, ""))[:FIELD_CHARS].replace("\n", " ")
              for name in ("effective-directive", "violated-directive", "blocked-uri", "document-uri",
                           "source-file", "line-number", "script-sample")}
    log.warning("CSP violation: %s refused %s on %s (%s:%s) %s", fields["effective-directive"]
                or fields["violated-directive"], fields["blocked-uri"] or "inline", fields["document-uri"],
                fields["source-file"], fields["line-number"], fields["script-sample"])
    return HttpResponse(status=204)
