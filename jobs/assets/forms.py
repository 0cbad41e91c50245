"""Upload forms for models (a zip of a Hugging Face folder) and datasets (JSONL or
CSV), shared by the pages and the API. They only check the fields; jobs.assets.uploads
validates the file itself."""
from __future__ import annotations

import unicodedata

from django import forms
from django.conf import settings


class ModelUploadForm(forms.Form):
    name = forms.SlugField(max_length=120)
    file = forms.FileField(help_text="A zip of a Hugging Face-format model folder (config.json + weights).")


class DatasetUploadForm(forms.Form):
    name = forms.CharField(max_length=120)
    file = forms.FileField(help_text="JSONL with a \"text\" field per line, or CSV with a \"text\" column.")

    def clean_name(self) -> str:
        """A name is shown as it is: no control characters (a line break) and no invisible
        format characters (a right-to-left override makes "exe.txt" read "txt.exe")."""
        name = self.cleaned_data["name"]
        for char in name:
            if unicodedata.category(char) in ("Cc", "Cf"):
                what = unicodedata.name(char, "a control character")
                raise forms.ValidationError(f"the name holds U+{ord(char):04X} ({what}), which is not shown as it is; "
                                            "use visible characters")
        return name


def upload_limit() -> int:
    return settings.MAX_UPLOAD_BYTES
