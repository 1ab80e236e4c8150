"""Label Studio project ids, normalised in one place.

``7``, ``"7"``, ``"007"``, ``/setup``'s ``"7.1700000000"`` and the webhook's ``{"id": 7}`` are all
project ``"7"``. Project ids become Redis keys, folder names under ``VERSIONS_DIR`` and part of
``model_version`` strings, so a project must have exactly one spelling, and that spelling must
stay small: Label Studio's ids are 64-bit database keys.
"""

from __future__ import annotations

from typing import Any

MAX_PROJECT_ID = 2**63 - 1
MAX_PROJECT_ID_DIGITS = len(str(MAX_PROJECT_ID))  # 19


def normalize_project_id(value: Any) -> str | None:
    """The canonical id (ASCII digits, no leading zeros) of a Label Studio ``project`` field.

    Accepts a non-negative int, a string of ASCII digits (surrounding blanks and leading zeros
    ignored), ``"<id>.<created timestamp>"`` and a project object ``{"id": ...}``. Returns
    ``None`` for anything else: bools, negative ids, ids over ``MAX_PROJECT_ID`` (checked on the
    digits before any conversion, so a 5,000-digit id costs nothing), non-ASCII digits such as
    ``"٣"``, floats, empty strings.
    """
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        digits = value.split(".", 1)[0].strip()
        if not (digits.isascii() and digits.isdigit()):
            return None
        digits = digits.lstrip("0") or "0"
        if len(digits) > MAX_PROJECT_ID_DIGITS:
            return None
        number = int(digits)
    else:
        return None
    return str(number) if 0 <= number <= MAX_PROJECT_ID else None
