"""The README documents every setting (STYLE: one settings object, every variable in the README)."""

import re
from pathlib import Path

from runtime.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _readme_rows() -> dict[str, str]:
    rows = {}
    for line in README.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]):
                rows[name] = cells[1]
    return rows


def test_every_setting_is_in_the_readme_table():
    rows = _readme_rows()
    missing = [name.upper() for name in Settings.model_fields if name.upper() not in rows]
    assert not missing, f"settings missing from the README table: {missing}"


def test_readme_defaults_match_the_settings_defaults():
    rows = _readme_rows()
    wrong = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if default is None or name.upper() not in rows:
            continue
        shown = rows[name.upper()]
        text = str(default).lower() if isinstance(default, bool) else str(default)
        if isinstance(default, float) and default.is_integer():
            text = str(int(default))
        if isinstance(default, Path):
            text = default.as_posix()
        if f"`{text}`" not in shown and text not in shown:
            wrong.append(f"{name.upper()}: README {shown!r}, settings {text!r}")
    assert not wrong, "README defaults differ from settings: " + "; ".join(wrong)
