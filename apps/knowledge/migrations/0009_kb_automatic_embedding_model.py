import apps.knowledge.models
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("knowledge", "0008_verbose_names")]

    operations = [
        # Existing bases keep the concrete model their vectors were built with (not automatic); bases created
        # from now on without a model choose it by the language of their documents.
        migrations.AddField(
            model_name="knowledgebase", name="embedding_model_auto",
            field=models.BooleanField(
                default=False, verbose_name="choose the embedding model automatically",
                help_text="By the language of the documents: the multilingual model when they hold a meaningful "
                          "share of Chinese."),
        ),
        migrations.AlterField(
            model_name="knowledgebase", name="embedding_model_auto",
            field=models.BooleanField(
                default=apps.knowledge.models.default_embedding_model_auto,
                verbose_name="choose the embedding model automatically",
                help_text="By the language of the documents: the multilingual model when they hold a meaningful "
                          "share of Chinese."),
        ),
        migrations.AddField(
            model_name="knowledgebase", name="embedding_choice",
            field=models.JSONField(blank=True, default=dict, editable=False, verbose_name="embedding model choice"),
        ),
        migrations.AlterField(
            model_name="knowledgebase", name="embedding_choice",
            field=models.JSONField(blank=True, default=apps.knowledge.models.default_embedding_choice, editable=False,
                                   verbose_name="embedding model choice"),
        ),
        migrations.AddField(
            model_name="document", name="lang_tokens",
            field=models.PositiveIntegerField(blank=True, editable=False, null=True, verbose_name="text tokens"),
        ),
        migrations.AddField(
            model_name="document", name="lang_cjk_tokens",
            field=models.PositiveIntegerField(default=0, editable=False, verbose_name="CJK tokens"),
        ),
    ]
