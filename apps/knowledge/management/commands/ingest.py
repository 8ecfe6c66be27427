from __future__ import annotations

from pathlib import Path

from django.core.management.base import CommandError
from django.utils.translation import gettext, gettext_lazy

from apps.core.management.base import Command as ProjectCommand

from ._process import prepare_process

from ._operator import operator_user
from ._output import progress, table


class Command(ProjectCommand):
    help = (gettext_lazy("Import and ingest files into a knowledge base, then rebuild its index. A file already "
                         "there under the same name is updated only if its bytes changed; failures are listed and "
                         "never stop the batch."))

    def add_arguments(self, parser):
        parser.add_argument("paths", nargs="+", help=gettext("Files or directories"))
        parser.add_argument("--kb", required=True, help=gettext("Knowledge base slug"))
        parser.add_argument("--recursive", "-r", action="store_true", help=gettext("Descend into subdirectories"))
        parser.add_argument("--create", action="store_true", help=gettext("Create the knowledge base if it does not exist"))
        parser.add_argument("--force", action="store_true", help=gettext("Re-ingest even unchanged documents"))
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, paths, kb, recursive, create, force, no_progress, **options):
        from apps.knowledge import services
        from apps.knowledge.models import KnowledgeBase

        prepare_process("worker")
        knowledge_base = KnowledgeBase.objects.filter(slug=kb).first()
        if knowledge_base is None:
            if not create:
                raise CommandError(gettext("No knowledge base %(kb)r (use --create to create it).") % {"kb": kb})
            knowledge_base = services.knowledge_base_create(user=operator_user(), slug=kb, name=kb.replace("-", " ").title())
        files, missing = _collect(paths, recursive)
        bar = progress(len(files), "ingesting", disable=no_progress)
        report = services.files_ingest(knowledge_base=knowledge_base, files=files, force=force,
                                       on_progress=lambda n: bar.update(n))
        bar.close()

        failures = [(name, code, message) for name, code, message in missing] + [
            (r.name, r.error_code, r.error_message) for r in report.outcomes if r.status in ("failed", "rejected")]
        counts = report.counts()
        rows = [[key, value] for key, value in counts.items()]
        rows += [[gettext("not found"), len(missing)], [gettext("chunks encoded"), report.encoded],
                 [gettext("chunks reused"), report.reused],
                 [gettext("index"), gettext("v%(version)s (%(status)s, %(chunks)s chunks)") % {
                     "version": report.build.version, "status": report.build.status, "chunks": report.build.chunk_count}
                  if report.build else gettext("not rebuilt")],
                 [gettext("seconds"), f"{report.seconds:.1f}"]]
        self.stdout.write(table([gettext("ingest"), knowledge_base.slug], rows))
        if failures:
            self.stdout.write(self.style.WARNING(gettext("%(failures)s file(s) failed:") % {"failures": len(failures)}))
            self.stdout.write(table([gettext("file"), gettext("error"), gettext("reason")], failures))


def _collect(paths: list[str], recursive: bool) -> tuple[list[tuple[str, Path]], list[tuple[str, str, str]]]:
    """(source name, path) pairs: names are relative to the directory given, so re-runs match documents."""
    files: list[tuple[str, Path]] = []
    missing: list[tuple[str, str, str]] = []
    for raw in paths:
        root = Path(raw)
        if root.is_file():
            files.append((root.name, root))
        elif root.is_dir():
            candidates = root.rglob("*") if recursive else root.iterdir()
            for path in sorted(candidates):
                relative = path.relative_to(root)
                if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                    files.append((relative.as_posix(), path))
        else:
            missing.append((raw, "not_found", "no such file or directory"))
    return files, missing
