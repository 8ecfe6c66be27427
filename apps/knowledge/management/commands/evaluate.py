from __future__ import annotations

from pathlib import Path

from django.core.management.base import CommandError
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from apps.core.management.base import Command as ProjectCommand

from ._output import progress, table
from ._process import prepare_process

MODES = ["dense", "bm25", "hybrid"]


class Command(ProjectCommand):
    help = (gettext_lazy("Evaluate retrieval. With --dataset: a BEIR dataset (e.g. ../shared/datasets/scifact) is "
                         "ingested into a scratch knowledge base and nDCG@10, Recall@100 and MRR@10 are printed "
                         "beside the published figures. With --questions: a labelled JSONL question set (question, "
                         "document, passage) is run against a knowledge base (--kb) or the documents of a folder "
                         "(--documents, ingested into a scratch base) and hit@1/3/5/10 and MRR@10 are printed per "
                         "mode and per subset. Stored embeddings are reused on later runs."))

    def add_arguments(self, parser):
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--dataset", help=_("BEIR folder: corpus.jsonl[.gz], queries.jsonl, qrels/"))
        source.add_argument("--questions", help=_("Labelled question set (JSONL: question, document, passage)"))
        parser.add_argument("--documents", help=_("With --questions: folder of the documents, ingested first "
                                                  "(names relative to it are what 'document' refers to)"))
        parser.add_argument("--mode", action="append", choices=MODES, help=_("Repeatable; default: all three"))
        parser.add_argument("--split", default="test", help=_("BEIR qrels split (default: test)"))
        parser.add_argument("--kb", help=_("Knowledge base slug (default: a scratch base eval-<name>)"))
        parser.add_argument("--chunk-tokens", type=int)
        parser.add_argument("--chunk-overlap", type=int)
        parser.add_argument("--calibrate", action="store_true",
                            help=_("Choose fusion (RRF k, min-max or z-score weight) on training queries first: with "
                                   "--dataset the --calibration-split queries, with --questions the question set "
                                   "itself (2-fold cross-validated figures are printed too)"))
        parser.add_argument("--calibration-split", default="train",
                            help=_("BEIR split to calibrate on (default: train)"))
        parser.add_argument("--mmr", action="store_true", help=_("With --calibrate: also try MMR lambdas"))
        parser.add_argument("--save", action="store_true",
                            help=_("With --calibrate: store the chosen settings on the knowledge base (used by "
                                   "retrieval and by the evaluation that follows)"))
        parser.add_argument("--json", action="store_true", help=_("One JSON object on stdout instead of tables"))
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, dataset, questions, documents, mode, split, kb, chunk_tokens, chunk_overlap, json,
               no_progress, calibrate, calibration_split, mmr, save, **options):
        prepare_process("worker")
        self.as_json = json
        self.calibration = {"on": calibrate, "split": calibration_split, "mmr": mmr, "save": save}
        if save and not calibrate:
            raise CommandError(_("--save goes with --calibrate."))
        modes = mode or MODES
        if dataset:
            if documents:
                raise CommandError(_("--documents goes with --questions, not with --dataset."))
            report = self._beir(Path(dataset), modes, split, kb, chunk_tokens, chunk_overlap, no_progress)
        else:
            report = self._labelled(Path(questions), documents, modes, kb, chunk_tokens, chunk_overlap, no_progress)
        if self.as_json:
            import json as json_module

            self.stdout.write(json_module.dumps(report, ensure_ascii=False, indent=1))

    # -- BEIR -------------------------------------------------------------------------------

    def _beir(self, root: Path, modes, split, kb, chunk_tokens, chunk_overlap, no_progress) -> dict:
        from apps.knowledge import evaluation

        if not root.is_dir():
            raise CommandError(_("No dataset folder %(path)r.") % {"path": str(root)})
        try:
            corpus, queries, qrels = evaluation.load_beir(root, split=split)
        except (OSError, ValueError, KeyError) as exc:
            raise CommandError(_("Not a readable BEIR dataset: %(error)s") % {"error": exc})
        slug = kb or f"eval-{root.name.lower()}"[:64]
        knowledge_base = evaluation.scratch_knowledge_base(slug=slug, name=f"Evaluation: {root.name}",
                                                           chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap)
        bar = progress(len(corpus), "ingesting corpus", disable=no_progress)
        stats = evaluation.beir_corpus_load(knowledge_base=knowledge_base, corpus=corpus, on_progress=bar.update)
        bar.close()
        self._corpus_table(root.name, stats)
        calibration = None
        if self.calibration["on"]:
            calibration = self._beir_calibrate(root, knowledge_base, no_progress)
        rows, results = [], []
        for name in modes:
            bar = progress(len(queries), f"queries ({name})", unit="query", disable=no_progress)
            result = evaluation.beir_evaluate(knowledge_base=knowledge_base, queries=queries, qrels=qrels, mode=name,
                                              on_progress=bar.update, dataset=root)
            bar.close()
            m = result.metrics
            reference = "-" if result.reference_ndcg10 is None else f"{result.reference_ndcg10:.3f}"
            ms = 1000 * result.seconds / max(result.queries, 1)
            rows.append([name, f"{m['ndcg@10']:.4f}", reference, f"{m['recall@100']:.4f}", f"{m['mrr@10']:.4f}",
                         result.queries, f"{ms:.1f}"])
            results.append({"mode": name, "metrics": m, "reference_ndcg10": result.reference_ndcg10,
                            "ms_per_query": ms})
        self._write(table(["mode", "nDCG@10", "reference nDCG@10", "Recall@100", "MRR@10", "queries", "ms/query"],
                          rows))
        note = evaluation.dataset_references(root).get("note") or "none published for this dataset"
        self._write(f"knowledge base {knowledge_base.slug}, chunks {knowledge_base.chunk_tokens}/"
                    f"{knowledge_base.chunk_overlap} tokens; references ({root.name}): {note}")
        return {"dataset": root.name, "split": split, "knowledge_base": knowledge_base.slug,
                "corpus": _stats_dict(stats), "calibration": calibration, "results": results}

    def _beir_calibrate(self, root: Path, knowledge_base, no_progress) -> dict:
        from apps.knowledge import evaluation

        split = self.calibration["split"]
        try:
            _, train_queries, train_qrels = evaluation.load_beir(root, split=split)
        except (OSError, ValueError, KeyError) as exc:
            raise CommandError(_("No readable %(split)s split: %(error)s") % {"split": split, "error": exc})
        ids = list(train_queries)
        bar = progress(len(ids), f"calibration candidates ({split})", unit="query", disable=no_progress)
        candidates = evaluation.query_candidates(knowledge_base=knowledge_base, queries=[train_queries[i] for i in ids],
                                                 depth=evaluation.RUN_DEPTH_DOCUMENTS * 4,
                                                 with_vectors=self.calibration["mmr"], on_progress=bar.update)
        bar.close()
        metric = evaluation.beir_metric(knowledge_base=knowledge_base, query_ids=ids, qrels=train_qrels)
        result = evaluation.ranking_calibrate(knowledge_base=knowledge_base, candidates=candidates, metric=metric,
                                              objective=f"nDCG@10 on {root.name} {split}",
                                              source=f"{root.name}:{split}", save=self.calibration["save"],
                                              try_mmr=self.calibration["mmr"])
        self._calibration_table(result)
        return result.to_dict()

    # -- labelled question sets ------------------------------------------------------------

    def _labelled(self, path: Path, documents, modes, kb, chunk_tokens, chunk_overlap, no_progress) -> dict:
        from apps.knowledge import evaluation
        from apps.knowledge.models import KnowledgeBase

        try:
            questions = evaluation.load_questions(path)
        except OSError as exc:
            raise CommandError(_("Cannot read %(path)s: %(error)s") % {"path": str(path), "error": exc.strerror or exc})
        except ValueError as exc:
            raise CommandError(_("Not a labelled question set (%(path)s): %(error)s") % {"path": str(path),
                                                                                        "error": exc})
        stats = None
        if documents:
            root = Path(documents)
            if not root.is_dir():
                raise CommandError(_("No documents folder %(path)r.") % {"path": documents})
            slug = kb or f"eval-{path.stem.lower()}"[:64]
            knowledge_base = evaluation.scratch_knowledge_base(slug=slug, name=f"Evaluation: {path.stem}",
                                                               chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap)
            count = len(evaluation.files_under(root))
            bar = progress(count, "ingesting documents", disable=no_progress)
            stats = evaluation.labelled_documents_load(knowledge_base=knowledge_base, root=root,
                                                       on_progress=bar.update)
            bar.close()
            self._corpus_table(root.name, stats)
        else:
            if not kb:
                raise CommandError(_("--questions needs --kb (an existing knowledge base) or --documents (a folder)."))
            knowledge_base = KnowledgeBase.objects.filter(slug=kb).first()
            if knowledge_base is None:
                raise CommandError(_("No knowledge base %(slug)r.") % {"slug": kb})
        missing = _unknown_documents(knowledge_base, questions)
        if missing:
            self.stderr.write(_("warning: %(count)d question(s) expect a document the knowledge base does not have: "
                                "%(names)s") % {"count": len(missing), "names": ", ".join(sorted(missing)[:5])})
        calibration = None
        if self.calibration["on"]:
            bar = progress(len(questions), "calibration candidates", unit="question", disable=no_progress)
            candidates = evaluation.query_candidates(knowledge_base=knowledge_base,
                                                     queries=[q.question for q in questions],
                                                     depth=evaluation.LABELLED_DEPTH,
                                                     with_vectors=self.calibration["mmr"], on_progress=bar.update)
            bar.close()
            metric = evaluation.labelled_metric(knowledge_base=knowledge_base, questions=questions)
            result = evaluation.ranking_calibrate(knowledge_base=knowledge_base, candidates=candidates, metric=metric,
                                                  objective=f"MRR@10 on {path.name}", source=str(path),
                                                  save=self.calibration["save"], cross_validate=True,
                                                  try_mmr=self.calibration["mmr"])
            self._calibration_table(result)
            calibration = result.to_dict()
        rows, subset_rows, results = [], [], []
        for name in modes:
            bar = progress(len(questions), f"questions ({name})", unit="question", disable=no_progress)
            result = evaluation.labelled_evaluate(knowledge_base=knowledge_base, questions=questions, mode=name,
                                                  on_progress=bar.update)
            bar.close()
            m = result.metrics
            data = result.to_dict()
            rows.append([name] + [f"{m[key]:.3f}" for key in ("hit@1", "hit@3", "hit@5", "hit@10", "mrr@10",
                                                             "doc_hit@3")]
                        + [int(m["queries"]), f"{data['ms_per_query']:.1f}"])
            for subset, sm in result.subsets.items():
                subset_rows.append([name, subset, int(sm["queries"]), f"{sm['hit@3']:.3f}", f"{sm['mrr@10']:.3f}",
                                    f"{sm['doc_hit@3']:.3f}"])
            results.append(data)
        self._write(table(["mode", "hit@1", "hit@3", "hit@5", "hit@10", "MRR@10", "doc hit@3", "questions",
                           "ms/query"], rows))
        if subset_rows:
            self._write(table(["mode", "subset", "questions", "hit@3", "MRR@10", "doc hit@3"], subset_rows))
        self._write(f"knowledge base {knowledge_base.slug}; a hit is a chunk of the expected document holding at least "
                    f"{evaluation.PASSAGE_COVERAGE:.0%} of the passage's token bigrams")
        return {"questions_file": str(path), "knowledge_base": knowledge_base.slug,
                "corpus": _stats_dict(stats) if stats else None, "missing_documents": sorted(missing),
                "calibration": calibration, "results": results}

    # -- output -----------------------------------------------------------------------------

    def _corpus_table(self, name: str, stats) -> None:
        self._write(table(["corpus", name], [
            ["documents", stats.documents], ["imported", stats.imported], ["unchanged", stats.unchanged],
            ["ingested", stats.ingested], ["failed", stats.failed], ["chunks encoded", stats.encoded],
            ["chunks reused", stats.reused], ["index", f"v{stats.index_version} ({stats.chunks} chunks)"],
            ["seconds", f"{stats.seconds:.1f}"],
        ]))
        if stats.failures:
            self._write(table(["file", "error", "reason"],
                              [[f.name, f.error_code, f.error_message] for f in stats.failures]))

    def _calibration_table(self, result) -> None:
        from apps.knowledge.rag.calibration import RankingParams

        rows = [["current", RankingParams(**result.current).label(), f"{result.current_score:.4f}"],
                ["chosen", RankingParams(**result.chosen).label(), f"{result.chosen_score:.4f}"]]
        rows += [[f"#{i}", label, f"{value:.4f}"] for i, (label, value) in enumerate(result.scored[:5], start=1)]
        if result.cross_validation:
            cv = result.cross_validation
            rows.append([f"{cv['folds']}-fold held-out", "chosen / current",
                         f"{cv['held_out']:.4f} / {cv['current_held_out']:.4f}"])
        rows.append(["saved on the base", "yes" if result.saved else "no (add --save)", ""])
        self._write(table(["calibration", result.objective, f"{result.queries} queries"], rows))

    def _write(self, text: str) -> None:
        if not self.as_json:
            self.stdout.write(text)


def _stats_dict(stats) -> dict:
    return {"documents": stats.documents, "imported": stats.imported, "unchanged": stats.unchanged,
            "ingested": stats.ingested, "failed": stats.failed, "encoded": stats.encoded, "reused": stats.reused,
            "index_version": stats.index_version, "chunks": stats.chunks, "seconds": round(stats.seconds, 2),
            "failures": [{"name": f.name, "code": f.error_code, "message": f.error_message} for f in stats.failures]}


def _unknown_documents(knowledge_base, questions) -> set[str]:
    from apps.knowledge.rag.evaluation import document_matches

    names = list(knowledge_base.documents.filter(deleted_at__isnull=True).values_list("source_name", "title"))
    return {q.document for q in questions
            if not any(document_matches(q.document, source, title) for source, title in names)}
