"""Storage namespaces, verified identity, scopes and group permissions."""
from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.cache import cache

from apps.plugins.models import PluginInvocation
from apps.plugins.runner import RpcError
from apps.plugins.services import _cache_key, _rpc_handler, plugins_turn_hook

pytestmark = pytest.mark.django_db


def _turn(make_turn, user, message, **kw):
    ctx = make_turn(user, message, **kw)
    plugins_turn_hook("before_retrieval", ctx)
    return ctx


def test_storage_is_per_plugin_and_per_user(plugins_dir, enable, user, other_user, make_turn):
    enable("recorder", config={"greeting": "hi"})
    first = _turn(make_turn, user, "record it").plugin_results[0]
    second = _turn(make_turn, user, "record it").plugin_results[0]
    bob = _turn(make_turn, other_user, "record it").plugin_results[0]
    assert (first.content, second.content, bob.content) == ("hi alice, call 1", "hi alice, call 2", "hi bob, call 1")
    # The values live in the shared cache (Redis in production) under the plugin's and the user's namespace.
    assert cache.get(_cache_key("recorder", "user", user.pk, "calls")) == 2
    assert cache.get(_cache_key("recorder", "user", other_user.pk, "calls")) == 1
    assert cache.get(_cache_key("recorder", "plugin", None, "all_calls")) == 3


def test_namespaces_are_chosen_by_the_platform_not_the_plugin(user, other_user):
    alice_a = _rpc_handler("plugin_a", scopes=["storage"], user=user)
    bob_a = _rpc_handler("plugin_a", scopes=["storage"], user=other_user)
    alice_b = _rpc_handler("plugin_b", scopes=["storage"], user=user)
    alice_a("storage.set", {"scope": "user", "key": "k", "value": {"secret": "alice's"}})
    alice_a("storage.set", {"scope": "plugin", "key": "k", "value": "plugin a"})
    assert bob_a("storage.get", {"scope": "user", "key": "k"}) is None
    assert alice_b("storage.get", {"scope": "user", "key": "k"}) is None
    assert alice_b("storage.get", {"scope": "plugin", "key": "k"}) is None
    assert alice_a("storage.get", {"scope": "user", "key": "k"}) == {"secret": "alice's"}
    with pytest.raises(RpcError) as bad_scope:
        alice_a("storage.get", {"scope": "user:%d" % other_user.pk, "key": "k"})
    assert bad_scope.value.code == "invalid_scope"
    with pytest.raises(RpcError) as too_big:
        alice_a("storage.set", {"scope": "plugin", "key": "k", "value": "x" * 70_000})
    assert too_big.value.code == "value_too_large"


def test_storage_without_the_scope_is_denied(user):
    handler = _rpc_handler("no_storage", scopes=["http"], user=user)
    with pytest.raises(RpcError) as exc:
        handler("storage.get", {"scope": "plugin", "key": "k"})
    assert (exc.value.outcome, exc.value.code) == ("denied", "scope_missing")
    with pytest.raises(RpcError) as tickets:
        handler("tickets.create", {"subject": "x"})
    assert tickets.value.code == "scope_missing"


def test_hook_sees_the_verified_identity_and_history_only_with_its_scope(plugins_dir, enable, user, make_turn):
    enable("recorder")
    ctx = _turn(make_turn, user, "record it", history=[{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "hello"}])
    result = ctx.plugin_results[0]
    assert result.ok and "alice" in result.content
    assert result.data["history_len"] == 2  # recorder declares conversation:read


def test_user_outside_allowed_groups_never_triggers_the_plugin(plugins_dir, enable, user, make_turn):
    support = Group.objects.create(name="support")
    enable("recorder", allowed_groups=[support])
    ctx = _turn(make_turn, user, "record it")
    assert ctx.plugin_results == []
    assert cache.get(_cache_key("recorder", "user", user.pk, "calls")) is None  # the hook never ran
    record = PluginInvocation.objects.get(plugin="recorder")
    assert (record.outcome, record.error_code, record.duration_ms) == ("denied", "group_not_allowed", 0.0)

    # Generic hooks are skipped for that user too.
    enable("recorder", config={"rewrite_query": "rewritten"}, allowed_groups=[support])
    ctx = make_turn(user, "what is the policy")
    plugins_turn_hook("before_retrieval", ctx)
    assert ctx.query == "what is the policy"

    user.groups.add(support)
    member = get_user_model().objects.get(pk=user.pk)  # fresh object: group names are cached per request user
    ctx = _turn(make_turn, member, "record it")
    assert ctx.plugin_results[0].ok and ctx.query == "rewritten"


def test_generic_hooks_rewrite_query_reorder_sources_and_observe_the_answer(plugins_dir, enable, user, make_turn):
    enable("recorder", config={"rewrite_query": "delay policy", "limit": 2})
    sources = [{"chunk_id": i, "document_id": 1, "document_title": "Policy", "text": f"chunk {i}", "score": 1 - i / 10}
               for i in range(4)]
    ctx = make_turn(user, "tell me about delays", sources=[])
    plugins_turn_hook("before_retrieval", ctx)
    assert ctx.query == "delay policy"
    ctx.sources = list(sources)
    plugins_turn_hook("after_retrieval", ctx)
    # Reversed and cut to `limit`: the hook may reorder and drop, and the objects are the platform's own.
    assert [s["chunk_id"] for s in ctx.sources] == [3, 2] and ctx.sources[0] is sources[3]
    ctx.answer = "Delays are refunded."
    plugins_turn_hook("after_answer", ctx)
    assert cache.get(_cache_key("recorder", "user", user.pk, "last_answer")) == "Delays are refunded."
    stages = set(PluginInvocation.objects.filter(plugin="recorder").values_list("stage", "outcome"))
    assert stages == {("before_retrieval", "ok"), ("after_retrieval", "ok"), ("after_answer", "ok")}


def test_anonymous_users_never_reach_plugins(plugins_dir, enable, make_turn):
    from django.contrib.auth.models import AnonymousUser

    enable("recorder")
    ctx = _turn(make_turn, AnonymousUser(), "record it")
    assert ctx.plugin_results == [] and not PluginInvocation.objects.exists()
