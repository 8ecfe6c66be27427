from django.db import migrations, models


def untouched_defaults_follow_the_measured_default(apps, schema_editor):
    """Bases still on the old default (RRF k=60, never calibrated) get `auto`, like every new base: hits of
    bases on different fusions are merged on different scales in a search across bases, and the measured
    default ranks better (docs/benchmarks.md, "Fusion by model"). A calibrated base keeps its choice."""
    KnowledgeBase = apps.get_model("knowledge", "KnowledgeBase")
    KnowledgeBase.objects.filter(fusion="rrf", rrf_k=60, retrieval_calibration={}).update(fusion="auto")


def back_to_rrf(apps, schema_editor):
    KnowledgeBase = apps.get_model("knowledge", "KnowledgeBase")
    KnowledgeBase.objects.filter(fusion="auto").update(fusion="rrf")


class Migration(migrations.Migration):

    dependencies = [
        ('knowledge', '0009_kb_automatic_embedding_model'),
    ]

    operations = [
        migrations.AlterField(
            model_name='knowledgebase',
            name='fusion',
            field=models.CharField(choices=[('auto', 'Measured default of the embedding model'), ('rrf', 'Reciprocal rank fusion'), ('weighted', 'Weighted (min-max normalised scores)'), ('zscore', 'Weighted (z-score normalised scores)')], default='auto', help_text="How dense and keyword results are combined. The measured default depends on the embedding model (rrf k and dense weight are then not used); evaluate --calibrate --save chooses on the base's own questions.", max_length=16, verbose_name='fusion'),
        ),
        migrations.RunPython(untouched_defaults_follow_the_measured_default, back_to_rrf),
    ]
