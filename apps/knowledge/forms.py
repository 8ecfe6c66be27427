from django import forms
from django.conf import settings
from django.utils.translation import gettext, gettext_lazy

from .models import Document, KnowledgeBase
from .selectors import MODES


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    """Django's documented pattern for an <input type=file multiple>: cleans to a list of files."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("widget", MultipleFileInput())
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None):
        single = super().clean
        if isinstance(data, (list, tuple)):
            return [single(item, initial) for item in data]
        return [single(data, initial)]


class UploadForm(forms.Form):
    knowledge_base = forms.ModelChoiceField(queryset=KnowledgeBase.objects.all(), label=gettext_lazy("Knowledge base"))
    files = MultipleFileField(label=gettext_lazy("Files"), help_text=gettext_lazy(
        "Select many files at once: PDF, DOCX, HTML, Markdown, CSV or text."))

    def __init__(self, *args, knowledge_bases=None, **kwargs):
        super().__init__(*args, **kwargs)
        if knowledge_bases is not None:
            self.fields["knowledge_base"].queryset = knowledge_bases


class DocumentAdminForm(forms.ModelForm):
    source_url = forms.URLField(max_length=1000, required=False, assume_scheme="https",
                                label=gettext_lazy("Source URL"),
                                help_text=gettext_lazy("Instead of a file: the page or file to fetch and ingest."))

    class Meta:
        model = Document
        fields = ["knowledge_base", "title", "file", "source_url"]

    def clean(self):
        cleaned = super().clean()
        upload, url = cleaned.get("file"), cleaned.get("source_url")
        if not upload and not url:
            raise forms.ValidationError(gettext("Upload a file or give a source URL."), code="no_content")
        size = getattr(upload, "size", None)
        if upload and "file" in self.changed_data and size is not None and size > settings.KNOWLEDGE_MAX_UPLOAD_BYTES:
            self.add_error("file", forms.ValidationError(
                gettext("too_large: the file is %(size)s bytes; the limit is %(limit)s bytes."), code="too_large",
                params={"size": size, "limit": settings.KNOWLEDGE_MAX_UPLOAD_BYTES}))
        return cleaned


class KnowledgeBaseAdminForm(forms.ModelForm):
    class Meta:
        model = KnowledgeBase
        fields = "__all__"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "embedding_model" in self.fields:
            from .embeddings import MODEL_AUTO, model_catalog, model_choices

            field = self.fields["embedding_model"]
            choices = model_choices()
            if len(model_catalog()) > 1:  # "automatic" chooses between the English and the multilingual model
                choices.insert(0, (MODEL_AUTO, gettext_lazy("Automatic: by the language of the documents")))
            self.fields["embedding_model"] = forms.ChoiceField(
                choices=choices, label=field.label, initial=field.initial,
                help_text=gettext_lazy("Automatic: the multilingual model when the documents hold a meaningful "
                                       "share of Chinese, else the English one. Changing the model re-embeds "
                                       "every chunk in the background."))
            if self.instance.embedding_model_auto:
                self.initial["embedding_model"] = MODEL_AUTO
        self.model_changed = False  # the concrete model changes: the admin queues a re-embed
        self.auto_enabled = False  # back to automatic: the documents already there decide

    def clean_embedding_model(self):
        from .services import embedding_model_fields

        value = self.cleaned_data["embedding_model"]
        kb = self.instance if self.instance.pk else None
        fields = embedding_model_fields({"embedding_model": value}, kb)
        current = self.instance.embedding_model
        concrete = fields.get("embedding_model", current)
        self.model_changed = kb is not None and concrete != current
        self.auto_enabled = kb is not None and bool(fields.get("embedding_model_auto")) and not kb.embedding_model_auto
        for name in ("embedding_model_auto", "embedding_choice"):
            if name in fields:
                setattr(self.instance, name, fields[name])
        return concrete

    def clean(self):
        cleaned = super().clean()
        tokens, overlap = cleaned.get("chunk_tokens"), cleaned.get("chunk_overlap")
        if tokens is not None and overlap is not None and overlap >= tokens:
            self.add_error("chunk_overlap", gettext("Must be smaller than the chunk size."))
        return cleaned


class TestRetrievalForm(forms.Form):
    q = forms.CharField(label=gettext_lazy("Query"), max_length=2000, widget=forms.TextInput(attrs={"size": 80, "autofocus": True}))
    mode = forms.ChoiceField(choices=[(m, m) for m in MODES], initial="hybrid")
    top_k = forms.IntegerField(min_value=1, max_value=50, initial=10)
