import os
from pathlib import Path

from django.core.management.base import CommandError
from django.utils.translation import gettext, gettext_lazy
from tqdm import tqdm

from apps.core.management.base import Command as ProjectCommand
from apps.core.errors import ApplicationError
from apps.monitoring.archive import FileArchiveStorage, archive_storage, conversations_restore
from apps.monitoring.audit import audit_actor


class Command(ProjectCommand):
    help = (gettext_lazy("Restore the conversations of an archive written by archive_conversations. FILE is a name "
                         "in the archive storage (see --list) or a local path. Conversations already present are "
                         "skipped."))

    def add_arguments(self, parser):
        parser.add_argument("file", nargs="?", help=gettext("Archive name or path."))
        parser.add_argument("--list", action="store_true", help=gettext("List the archives in the storage."))

    def handle(self, *args, file: str | None, list: bool, verbosity: int = 1, **options):
        try:
            storage = archive_storage()
            if list:
                for name in storage.names():
                    self.stdout.write(name)
                return
            if not file:
                raise CommandError(gettext("Name the archive to restore (see --list)."))
            if os.sep in file and os.path.isfile(file):  # a local copy, e.g. downloaded from the bucket
                storage, file = FileArchiveStorage(Path(file).resolve().parent), Path(file).name
            bar = tqdm(unit="conversation", desc="restoring", disable=verbosity < 1, file=self.stderr._out)
            try:
                with audit_actor("command:restore_conversations"):
                    result = conversations_restore(name=file, storage=storage, progress=bar.update,
                                                   on_total=lambda n: setattr(bar, "total", n) or bar.refresh())
            finally:
                bar.close()
        except ApplicationError as exc:
            raise CommandError(gettext("%(message)s [%(code)s]") % {"message": exc.message, "code": exc.code}) from exc
        self.stdout.write(self.style.SUCCESS(
            gettext("Restored %(restored)s conversation(s) (%(objects)s rows); %(skipped)s already present.")
            % {"restored": result.restored, "objects": result.objects, "skipped": len(result.skipped)}))
        if result.failed:
            for session_id, reason in result.failed.items():
                self.stderr.write(gettext("could not restore %(session_id)s: %(reason)s")
                                  % {"session_id": session_id, "reason": reason})
            raise CommandError(gettext("%(failed)s conversation(s) could not be restored; the archive is unchanged.")
                               % {"failed": len(result.failed)})
