"""The staff audit log page (/audit/) and its CSV export (?format=csv, same filters)."""
from __future__ import annotations

import csv

from django import forms
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.http import require_safe

from jobs import pages
from jobs.audit import selectors
from jobs.models import Team

PAGE_SIZE = 100


class AuditFilterForm(forms.Form):
    area = forms.ChoiceField(required=False, choices=[("", "all")] + [(a, a) for a in selectors.AREAS])
    team = forms.CharField(required=False, max_length=64, help_text="A team's slug, or - for site-wide entries.")
    actor = forms.CharField(required=False, max_length=150, label="User")
    q = forms.CharField(required=False, max_length=200, label="Contains")
    since = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))

    def clean_team(self) -> str:
        slug = self.cleaned_data["team"].strip()
        if slug and slug != "-" and not Team.objects.filter(slug=slug).exists():
            raise forms.ValidationError(f"No team {slug!r}.")
        return slug

    def clean(self):
        data = super().clean()
        if data.get("since") and data.get("until") and data["since"] > data["until"]:
            self.add_error("until", "The end is before the start.")
        return data

    def audit_filter(self) -> selectors.AuditFilter:
        data = {k: v for k, v in self.cleaned_data.items() if v not in (None, "")}
        return selectors.AuditFilter(**data)


class Echo:
    def write(self, value: str) -> str:
        return value


@login_required
@require_safe
def audit_log(request: HttpRequest) -> HttpResponse:
    """Staff only (anyone else: 404). Filters by area, team, user, text and days."""
    pages.require_staff(request)
    form = AuditFilterForm(request.GET)
    if not form.is_valid():
        return pages.render_page(request, "audit/audit_log.html", {"form": form, "page": None}, nav="audit",
                                 status=400)
    entries = selectors.audit_entries(form.audit_filter())
    if request.GET.get("format") == "csv":
        writer = csv.writer(Echo())
        response = StreamingHttpResponse((writer.writerow(row) for row in selectors.csv_rows(entries)),
                                         content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="audit-{timezone.now():%Y%m%d-%H%M}.csv"'
        return response
    page = Paginator(entries, PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return pages.render_page(request, "audit/audit_log.html", {
        "form": form, "page": page, "query": query.urlencode(),
        "rows": [(e, selectors.area_of(e.subject)) for e in page],
    }, nav="audit")
