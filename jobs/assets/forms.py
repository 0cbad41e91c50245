"""Upload forms for models (a zip of a Hugging Face folder) and datasets (JSONL or
CSV), shared by the pages and the API. They only check the fields; jobs.assets.uploads
validates the file itself."""
from __future__ import annotations

from django import forms
from django.conf import settings

from jobs.validators import shown_as_is


class ModelUploadForm(forms.Form):
    name = forms.SlugField(max_length=120)
    file = forms.FileField(help_text="A zip of a Hugging Face-format model folder (config.json + weights).")


class DatasetUploadForm(forms.Form):
    name = forms.CharField(max_length=120, validators=[shown_as_is])
    file = forms.FileField(help_text="JSONL with a \"text\" field per line, or CSV with a \"text\" column.")


def upload_limit() -> int:
    return settings.MAX_UPLOAD_BYTES
