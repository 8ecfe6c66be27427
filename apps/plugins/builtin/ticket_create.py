"""ticket_create: hands the conversation to a human.

Opens a support ticket (staff see it in the admin under Plugins > Support tickets, with the
conversation transcript the platform attaches) and tells the user its number.
"""
from __future__ import annotations

from apps.plugins.base import SCOPE_TICKETS, BasePlugin, HookContext, PluginError, Result, intent_hook


class TicketCreatePlugin(BasePlugin):
    name = "ticket_create"
    description = "Hands the conversation to a human: opens a support ticket and tells the user its number."
    version = "1.0.0"
    scopes = (SCOPE_TICKETS,)
    config_schema = {
        "type": "object",
        "properties": {
            "priority": {"type": "string", "enum": ["low", "normal", "high", "urgent"], "default": "normal"},
            "subject_prefix": {"type": "string", "maxLength": 40, "default": "Chat handoff: "},
            "reply_template": {
                "type": "string", "minLength": 1,
                "default": "Support ticket {number} has been opened for you. A member of our support team "
                           "will pick it up and reply to {contact}.",
                "description": "Placeholders: {number}, {contact} (the user's email or username).",
            },
        },
        "additionalProperties": False,
    }

    @intent_hook(intent="human_handoff", priority=10, examples=[
        "I want to talk to a human",
        "connect me with a support agent",
        "can I speak to a real person",
        "open a support ticket",
        "this isn't helping, escalate this",
        "I need to contact customer service",
        "please have someone call me back",
        "file a complaint with support",
        "I want to speak to a manager",
        "get me a live agent",
    ])
    def hand_off(self, ctx: HookContext) -> Result:
        subject = (ctx.config["subject_prefix"] + " ".join(ctx.message.split()))[:200]
        ticket = ctx.tickets.create(subject=subject, description=ctx.message, priority=ctx.config["priority"])
        number = ticket.get("number")
        if not number:
            raise PluginError("ticket_not_created", "the ticket service returned no number")
        contact = ctx.user.email or ctx.user.username
        try:
            content = ctx.config["reply_template"].format(number=number, contact=contact)
        except (KeyError, IndexError, ValueError):
            content = f"Support ticket {number} has been opened for you."
        # A handoff needs no knowledge-base answer; the ticket is the answer.
        ctx.skip_retrieval = True
        return Result(title=f"Support ticket {number}", content=content,
                      data={"ticket_number": number, "ticket_id": ticket.get("id"), "status": ticket.get("status")})
