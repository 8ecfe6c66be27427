"""`manage.py <command> --help` works for every project command, in English and in Chinese."""
from __future__ import annotations

from pathlib import Path

import pytest
from django.core.management import find_commands, load_command_class
from django.utils import translation

from apps.core.management.base import Command as ProjectCommand

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = sorted(
    (app.parent.parent.name, name)
    for app in ROOT.glob("apps/*/management/commands")
    for name in find_commands(str(app.parent))
)


def test_the_project_has_commands():
    assert ("knowledge", "evaluate") in COMMANDS and len(COMMANDS) >= 10


@pytest.mark.parametrize(("app", "name"), COMMANDS)
@pytest.mark.parametrize("language", ["en", "zh-hans"])
def test_help_renders(app, name, language):
    command = load_command_class(f"apps.{app}", name)
    assert isinstance(command, ProjectCommand), f"{name} should derive from apps.core.management.base.Command"
    with translation.override(language):
        text = command.create_parser("manage.py", name).format_help()
    assert text.startswith(f"usage: manage.py {name}")
    assert "--help" in text
    if language == "zh-hans":
        assert any("\u4e00" <= ch <= "\u9fff" for ch in text), f"{name} help is not translated"
