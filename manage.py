#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""
import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kotaemon_site.settings")
    # Commands speak the operator's language (zh_CN.UTF-8 -> Chinese): see apps.core.i18n.command_language.
    os.environ.setdefault("KOTAEMON_COMMAND_LANGUAGE", "auto")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
