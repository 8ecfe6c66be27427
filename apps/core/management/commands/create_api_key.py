from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError
from django.utils import timezone
from django.utils.translation import gettext, gettext_lazy

from apps.core.management.base import Command as ProjectCommand
from apps.core.errors import ApplicationError
from apps.core.models import SCOPES
from apps.core.services import api_key_create


class Command(ProjectCommand):
    help = gettext_lazy("Create an API key for USERNAME and print it once (only its hash is stored).")

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="")
        parser.add_argument("--expires-days", type=int, default=None, help=gettext("Expire the key after this many days."))
        parser.add_argument("--scopes", default="", help=gettext("Comma-separated scopes (default: all): %(scopes)s.")
                            % {"scopes": ", ".join(SCOPES)})

    def handle(self, *args, username: str, name: str, expires_days: int | None, scopes: str = "", **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(gettext("No user named %(username)r.") % {"username": username})
        expires_at = timezone.now() + timedelta(days=expires_days) if expires_days else None
        wanted = [s.strip() for s in scopes.split(",") if s.strip()] or None
        try:
            issued = api_key_create(user=user, name=name, expires_at=expires_at, scopes=wanted)
        except ApplicationError as exc:
            raise CommandError(gettext("%(message)s [%(code)s]") % {"message": exc.message, "code": exc.code}) from exc
        self.stderr.write(gettext("Created key %(prefix)s for %(username)s. It is shown once; store it now:")
                          % {"prefix": issued.api_key.prefix, "username": username})
        self.stdout.write(issued.raw_key)
