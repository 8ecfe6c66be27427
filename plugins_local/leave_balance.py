"""Example plugin: tells employees how much leave they have left.

Drop a module like this into the plugins directory (PLUGINS_DIR, default plugins_local/), run
`manage.py plugins reload`, then enable and configure it in the admin (Plugins > Plugins).
See docs/plugins.md for the walk-through.

With `hr_api_url` set it asks the HR system (GET {hr_api_url}/employees/{email}/leave, answering
{"annual_remaining": 12, "sick_remaining": 5}); without it, it answers from the configured demo
allowance minus the days recorded in the user's own storage namespace.
"""
from __future__ import annotations

import urllib.parse

from apps.plugins.base import SCOPE_HTTP, SCOPE_STORAGE, BasePlugin, HookContext, Result, intent_hook


class LeaveBalancePlugin(BasePlugin):
    name = "leave_balance"
    description = "Remaining annual and sick leave of the signed-in employee."
    version = "1.0.0"
    scopes = (SCOPE_HTTP, SCOPE_STORAGE)
    config_schema = {
        "type": "object",
        "properties": {
            "hr_api_url": {"type": "string", "pattern": "^(https?://.+)?$", "default": "", "x-allow-host": True,
                           "description": "HR system root; empty = demo allowance"},
            "annual_days": {"type": "integer", "minimum": 0, "maximum": 365, "default": 25},
            "sick_days": {"type": "integer", "minimum": 0, "maximum": 365, "default": 10},
            "hr_api_token": {"type": "string", "secret": True},
        },
        "additionalProperties": False,
    }

    def setup(self, config, storage):
        super().setup(config, storage)
        # setup runs once per worker process; cheap and idempotent by design.
        storage.incr("setups")

    @intent_hook(intent="leave_balance", priority=5, examples=[
        "how many vacation days do I have left",
        "what's my remaining PTO balance",
        "how much annual leave do I have",
        "check my leave balance",
        "how many sick days have I used this year",
        "do I have any holiday allowance left",
        "how many days off can I still take",
        "show my time-off balance",
    ])
    def balance(self, ctx: HookContext) -> Result:
        if ctx.config["hr_api_url"]:
            email = urllib.parse.quote(ctx.user.email or ctx.user.username, safe="")
            headers = {"Authorization": f"Bearer {ctx.config['hr_api_token']}"} if ctx.config.get("hr_api_token") else {}
            resp = ctx.http.get(f"{ctx.config['hr_api_url'].rstrip('/')}/employees/{email}/leave", headers=headers)
            resp.raise_for_status()
            data = resp.json()
            annual, sick = data.get("annual_remaining"), data.get("sick_remaining")
        else:
            annual = ctx.config["annual_days"] - int(ctx.user_storage.get("annual_taken", 0))
            sick = ctx.config["sick_days"] - int(ctx.user_storage.get("sick_taken", 0))
        return Result(title="Your leave balance (HR)",
                      content=f"{ctx.user.username} has {annual} days of annual leave and {sick} sick days left.",
                      data={"annual_remaining": annual, "sick_remaining": sick})
