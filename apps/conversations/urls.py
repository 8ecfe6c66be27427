from django.urls import path

from . import views

urlpatterns = [
    path("chat/", views.ChatView.as_view(), name="chat"),
    path("chat/turns/<str:turn_id>/events/", views.TurnEventsView.as_view(), name="chat-turn-events"),
    path("conversations/", views.ConversationListView.as_view(), name="conversations"),
    path("conversations/<str:session_id>/", views.ConversationDetailView.as_view(), name="conversation"),
    path("conversations/<str:session_id>/messages/", views.MessageListView.as_view(), name="conversation-messages"),
    path("messages/<int:message_id>/feedback/", views.FeedbackView.as_view(), name="message-feedback"),
]
