"""docs/configuration.md is what server.settings_doc renders from Settings: every setting, documented."""

from server.settings import Settings
from server.settings_doc import render
from tests.conftest import ROOT


def test_the_configuration_reference_is_up_to_date():
    assert (ROOT / "docs" / "configuration.md").read_text() == render(), \
        "run: python -m server.settings_doc > docs/configuration.md"


def test_every_setting_has_a_row_and_a_description():
    text = render()
    for name, field in Settings.model_fields.items():
        assert f"`--{name.replace('_', '-')}`" in text
        assert field.description, name
