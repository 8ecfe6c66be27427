import apps.knowledge.models
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("knowledge", "0006_chunk_search_context")]

    operations = [
        # Existing bases keep the model their vectors were built with; new ones get the default.
        migrations.AddField(
            model_name="knowledgebase", name="embedding_model",
            field=models.CharField(default="all-minilm-l6-v2", max_length=64,
                                   help_text="Changing it re-embeds every chunk in the background."),
        ),
        migrations.AlterField(
            model_name="knowledgebase", name="embedding_model",
            field=models.CharField(default=apps.knowledge.models.default_embedding_model, max_length=64,
                                   help_text="Changing it re-embeds every chunk in the background."),
        ),
        migrations.AddField(model_name="indexversion", name="embedding_key",
                            field=models.CharField(blank=True, max_length=64)),
        migrations.AddField(model_name="indexversion", name="embedding_backend",
                            field=models.CharField(blank=True, max_length=16)),
        migrations.AddField(model_name="indexversion", name="embedding_dimension",
                            field=models.PositiveIntegerField(blank=True, null=True)),
        migrations.AddField(model_name="indexversion", name="encode_total",
                            field=models.PositiveIntegerField(default=0)),
    ]
