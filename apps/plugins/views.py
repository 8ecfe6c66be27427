from django.contrib.auth.models import Group
from django.utils.translation import gettext
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.core.errors import ApplicationError

from .selectors import invocation_stats_for, plugin_list_for, tickets_for
from .serializers import PluginConfigUpdateSerializer, TicketSerializer
from .services import plugin_config_update, plugins_reload


class PluginListView(APIView):
    api_key_scope = "manage"  # plugin administration, even to read (apps/core/scopes.py)
    @extend_schema(responses=dict, summary="Plugins with status, problems and load errors (staff)")
    def get(self, request):
        return Response(plugin_list_for(user=request.user))


class PluginDetailView(APIView):
    @extend_schema(request=PluginConfigUpdateSerializer, responses=dict,
                   summary="Enable, disable or reconfigure a plugin (staff); effective without a restart")
    def patch(self, request, name: str):
        params = PluginConfigUpdateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = dict(params.validated_data)
        if "allowed_groups" in data:
            names = data["allowed_groups"]
            groups = list(Group.objects.filter(name__in=names))
            missing = sorted(set(names) - {g.name for g in groups})
            if missing:
                raise ApplicationError("unknown_groups", gettext("No such groups."), details={"groups": missing})
            data["allowed_groups"] = groups
        plugin_config_update(name=name, actor=request.user, **data)
        listing = plugin_list_for(user=request.user)
        return Response(next(p for p in listing["plugins"] if p["name"] == name))


class PluginReloadView(APIView):
    @extend_schema(request=None, responses=dict, summary="Discover plugin modules again on every instance (staff)")
    def post(self, request):
        snap = plugins_reload(actor=request.user)
        return Response({"version": snap.version, "load_errors": snap.load_errors})


class PluginStatsView(APIView):
    api_key_scope = "manage"  # plugin administration, even to read (apps/core/scopes.py)
    @extend_schema(parameters=[OpenApiParameter("days", int)], responses=dict,
                   summary="Invocations per plugin: outcomes, success rate, p95 duration (staff)")
    def get(self, request):
        raw = request.query_params.get("days")
        if raw is not None and (not raw.isdigit() or not 1 <= int(raw) <= 90):
            raise ApplicationError("invalid_days", gettext("days must be an integer from 1 to 90."))
        return Response({"plugins": invocation_stats_for(user=request.user, days=int(raw) if raw else None)})


class TicketListView(APIView):
    @extend_schema(responses=TicketSerializer(many=True), summary="Your support tickets")
    def get(self, request):
        return Response(TicketSerializer(tickets_for(user=request.user)[:100], many=True).data)
