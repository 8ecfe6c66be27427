from __future__ import annotations

from django.core.management.base import CommandError
from django.utils.translation import gettext, gettext_lazy, gettext_noop

from apps.core.management.base import Command as ProjectCommand

from ._process import prepare_process

from ._output import progress, table


# gettext_noop: marked for the catalog here, translated when the table is printed.
HEADERS = (gettext_noop("knowledge base"), gettext_noop("status"), gettext_noop("version"), gettext_noop("documents"),
           gettext_noop("chunks"), gettext_noop("encoded"), gettext_noop("seconds"))


class Command(ProjectCommand):
    help = gettext_lazy("Write a new index version from stored embeddings and activate it (nothing is re-encoded).")

    def add_arguments(self, parser):
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument("--kb", action="append", help=gettext("Knowledge base slug (repeatable)"))
        group.add_argument("--all", action="store_true", help=gettext("Every knowledge base"))
        parser.add_argument("--if-changed", action="store_true",
                            help=gettext("Skip knowledge bases whose active index already covers their content"))
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, kb, all, if_changed, no_progress, **options):
        from apps.knowledge.models import KnowledgeBase
        from apps.knowledge.services import index_rebuild

        prepare_process("worker")
        if all:
            kbs = list(KnowledgeBase.objects.order_by("slug"))
        else:
            kbs = list(KnowledgeBase.objects.filter(slug__in=kb).order_by("slug"))
            unknown = set(kb) - {k.slug for k in kbs}
            if unknown:
                raise CommandError(gettext("No knowledge base %(slugs)s.") % {"slugs": ', '.join(sorted(unknown))})
        rows = []
        bar = progress(len(kbs), "rebuilding", unit="kb", disable=no_progress)
        for knowledge_base in kbs:
            result = index_rebuild(knowledge_base_id=knowledge_base.pk, force=not if_changed)
            rows.append([knowledge_base.slug, result.status, f"v{result.version}" if result.version else "-",
                         result.document_count, result.chunk_count, result.encoded, f"{result.seconds:.2f}"])
            bar.update(1)
        bar.close()
        self.stdout.write(table([gettext(h) for h in HEADERS], rows))
