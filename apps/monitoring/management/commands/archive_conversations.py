from django.core.management.base import CommandError
from django.utils.translation import gettext, gettext_lazy
from tqdm import tqdm

from apps.core.management.base import Command as ProjectCommand
from apps.core.errors import ApplicationError
from apps.monitoring.archive import conversations_archive, parse_age
from apps.monitoring.audit import audit_actor


class Command(ProjectCommand):
    help = (gettext_lazy("Move conversations idle for longer than --older-than to a compressed JSON Lines archive "
                         "(ARCHIVE_ROOT, or the S3 bucket ARCHIVE_S3_BUCKET) and remove them from the database. "
                         "Bring them back with restore_conversations."))

    def add_arguments(self, parser):
        parser.add_argument("--older-than", required=True, help=gettext("Idle age, e.g. 90d, 12h, 2w."))
        parser.add_argument("--dry-run", action="store_true", help=gettext("Only count what would be archived."))
        parser.add_argument("--batch-size", type=int, default=200)

    def handle(self, *args, older_than: str, dry_run: bool, batch_size: int, verbosity: int = 1, **options):
        if batch_size < 1:
            raise CommandError(gettext("--batch-size must be at least 1."))
        bar = tqdm(unit="conversation", desc="archiving", disable=verbosity < 1 or dry_run, file=self.stderr._out)
        try:
            with audit_actor("command:archive_conversations"):
                result = conversations_archive(older_than=parse_age(older_than), dry_run=dry_run,
                                               batch_size=batch_size, progress=bar.update,
                                               on_total=lambda n: setattr(bar, "total", n) or bar.refresh())
        except ApplicationError as exc:
            raise CommandError(gettext("%(message)s [%(code)s]") % {"message": exc.message, "code": exc.code}) from exc
        finally:
            bar.close()
        if dry_run:
            self.stdout.write(gettext("%(candidates)s conversation(s) would be archived.")
                              % {"candidates": result.candidates})
            return
        if not result.archived:
            self.stdout.write(gettext("Nothing to archive."))
            return
        self.stdout.write(self.style.SUCCESS(
            gettext("Archived %(archived)s conversation(s) (%(objects)s rows, %(bytes)s bytes) to "
                    "%(location)s; removed %(deleted)s from the database.")
            % {"archived": result.archived, "objects": result.objects, "bytes": result.bytes, "location": result.location, "deleted": result.deleted}))
        if result.kept_changed:
            self.stdout.write(self.style.WARNING(
                gettext("%(kept_changed)s changed while archiving and stay in the database (the next run archives "
                        "them).")
                % {"kept_changed": len(result.kept_changed)}))
