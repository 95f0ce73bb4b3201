"""docs/configuration.md, generated from `Settings` so the reference never drifts from the code.

    python -m server.settings_doc > docs/configuration.md    (tests/test_settings_doc.py checks it)
"""

from __future__ import annotations

from pydantic_core import PydanticUndefined

from server.settings import ENV_PREFIX, Settings

_HEADER = f"""# Configuration

Every setting is a command-line flag, an environment variable `{ENV_PREFIX}<NAME>` and a key of an optional
TOML file (`--config FILE` or `{ENV_PREFIX}CONFIG`). Precedence: flags > environment > file > defaults.
Boolean flags have a `--no-` form; lists are space-separated after the flag.
Generated from `server/settings.py` by `python -m server.settings_doc`; do not edit by hand.

| flag | environment | default | what it does |
|---|---|---|---|
"""


def _default(name: str) -> str:
    field = Settings.model_fields[name]
    if field.default_factory is not None:
        return "(see description)"
    value = field.default
    if value is PydanticUndefined or value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`"


def render() -> str:
    """The configuration reference as Markdown."""
    rows = []
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        flag, env = f"--{name.replace('_', '-')}", f"{ENV_PREFIX}{name.upper()}"
        rows.append(f"| `{flag}` | `{env}` | {_default(name)} | {description} |")
    return _HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
