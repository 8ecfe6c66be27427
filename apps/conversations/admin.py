from django.contrib import admin

from apps.core import authz

from .models import Conversation, Feedback, Message


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    can_delete = False
    fields = ["role", "content", "generator", "prompt_tokens", "completion_tokens", "latency_ms", "error_code",
              "created_at"]
    readonly_fields = fields
    show_change_link = True


@admin.register(Conversation)
class ConversationAdmin(authz.AuthzAdminMixin, admin.ModelAdmin):
    list_display = ["title", "owner", "session_id", "archived", "created_at", "updated_at"]
    list_filter = ["archived"]
    search_fields = ["title", "session_id", "owner__username"]
    readonly_fields = ["session_id", "owner", "created_at", "updated_at"]
    inlines = [MessageInline]
    list_select_related = ["owner"]


@admin.register(Message)
class MessageAdmin(authz.AuthzAdminMixin, admin.ModelAdmin):
    list_display = ["id", "conversation", "role", "generator", "latency_ms", "error_code", "created_at"]
    list_filter = ["role", "generator", "error_code"]
    search_fields = ["content", "conversation__session_id"]
    readonly_fields = ["conversation", "role", "content", "query", "citations", "plugin_results", "generator",
                       "prompt_tokens", "completion_tokens", "latency_ms", "error_code", "created_at"]
    list_select_related = ["conversation"]


@admin.register(Feedback)
class FeedbackAdmin(authz.AuthzAdminMixin, admin.ModelAdmin):
    list_display = ["message", "user", "rating", "comment", "updated_at"]
    list_filter = ["rating"]
    search_fields = ["comment", "user__username"]
    readonly_fields = ["message", "user", "created_at", "updated_at"]
