"""Field rules shared by the forms of every area (web pages and the API use the same
forms, so both refuse the same input with the same message) and by the models' fields
(so the Django admin's forms refuse it too)."""
from __future__ import annotations

import unicodedata

from django.core.exceptions import ValidationError
from django.utils.deconstruct import deconstructible


@deconstructible
class ShownAsIs:
    """A name people give (a dataset's, a token's, a team's) is shown as it is: no
    control characters (a line break) and no invisible format characters (a
    right-to-left override makes "\\u202egnp.exe" read "exe.png"). The message names
    the field and the character."""

    def __init__(self, field: str = "name"):
        self.field = field

    def __call__(self, value: str) -> None:
        for char in value:
            if unicodedata.category(char) in ("Cc", "Cf"):
                what = unicodedata.name(char, "a control character")
                raise ValidationError(f"the {self.field} holds U+{ord(char):04X} ({what}), which is not shown as "
                                      "it is; use visible characters", code="invisible_character")

    def __eq__(self, other) -> bool:
        return isinstance(other, ShownAsIs) and other.field == self.field


shown_as_is = ShownAsIs()
