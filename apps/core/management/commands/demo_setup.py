import os

from pathlib import Path

from django.contrib.auth import get_user_model
from django.utils.translation import gettext, gettext_lazy

from apps.core.management.base import Command as ProjectCommand


class Command(ProjectCommand):
    help = gettext_lazy("Prepare the embedded demo: a demo admin and the sample knowledge base. Idempotent.")

    def add_arguments(self, parser):
        parser.add_argument("--username", default=os.environ.get("DEMO_ADMIN_USER", "admin"))
        parser.add_argument("--password", default=os.environ.get("DEMO_ADMIN_PASSWORD", "admin"))

    def handle(self, *args, username: str, password: str, **options):
        from apps.core.services import demo_admin_ensure

        created = demo_admin_ensure(username=username, password=password)
        from apps.knowledge.services import demo_knowledge_load

        demo_knowledge_load(owner=get_user_model().objects.get(username=username), stdout=self.stdout)
        from django.conf import settings

        # Later manage.py commands in this checkout find the demo settings (settings.DEMO_MARKER); only for the
        # checkout's own data dir, which is what the marker stands for (a demo elsewhere must not leave one).
        if settings.DEMO and Path(settings.DATA_DIR) == settings.DEMO_MARKER.parent:
            settings.DEMO_MARKER.parent.mkdir(parents=True, exist_ok=True)
            settings.DEMO_MARKER.write_text(str(settings.BASE_DIR), encoding="utf-8")
        message = (gettext("Created the demo admin.") if created else gettext("Kept the demo admin.")) + " " + gettext(
            "Sign in at http://127.0.0.1:8000/admin/ as %(username)s / %(password)s (demo only: change it before "
            "exposing this machine).") % {"username": username, "password": password}
        self.stdout.write(self.style.SUCCESS(message))
