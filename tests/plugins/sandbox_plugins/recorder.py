"""A well-behaved plugin that records its lifecycle in its storage, for reload and storage tests."""
from apps.plugins.base import SCOPE_CONVERSATION, SCOPE_STORAGE, BasePlugin, Result, hook, intent_hook


class Recorder(BasePlugin):
    name = "recorder"
    version = "2.1.0"
    scopes = (SCOPE_STORAGE, SCOPE_CONVERSATION)
    config_schema = {
        "type": "object",
        "properties": {
            "greeting": {"type": "string", "minLength": 1, "default": "hello"},
            "limit": {"type": "integer", "minimum": 1, "maximum": 10, "default": 3},
            "rewrite_query": {"type": "string", "default": ""},
            "token": {"type": "string", "secret": True},
        },
        "additionalProperties": False,
    }

    def setup(self, config, storage):
        super().setup(config, storage)
        storage.incr("setups")
        storage.set("last_greeting", config["greeting"])

    def teardown(self):
        self.storage.incr("teardowns")

    @intent_hook(intent="record_it", keywords=[r"\brecord it\b"])
    def record(self, ctx):
        count = ctx.user_storage.incr("calls")
        ctx.storage.incr("all_calls")
        return Result(title="Recorder", content=f"{ctx.config['greeting']} {ctx.user.username}, call {count}",
                      data={"user_calls": count, "history_len": len(ctx.history),
                            "token_set": bool(ctx.config.get("token"))})

    @hook("before_retrieval")
    def rewrite(self, ctx):
        if ctx.config["rewrite_query"]:
            ctx.query = ctx.config["rewrite_query"]

    @hook("after_retrieval")
    def reverse(self, ctx):
        ctx.sources.reverse()
        del ctx.sources[ctx.config["limit"]:]

    @hook("after_answer")
    def remember(self, ctx):
        ctx.user_storage.set("last_answer", ctx.answer)
