"""The base of the project's management commands."""
from __future__ import annotations

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    """A ``BaseCommand`` whose ``help`` may be lazily translated: argparse needs a plain string for the
    description (a lazy one made every ``manage.py <command> --help`` fail with a TypeError), so it is
    rendered in the active language when the parser is built."""

    def create_parser(self, prog_name, subcommand, **kwargs):
        self.help = str(self.help)
        return super().create_parser(prog_name, subcommand, **kwargs)
