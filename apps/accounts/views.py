from django.contrib.auth import views as auth_views
from django.http import HttpResponseRedirect

from . import oidc


class LogoutView(auth_views.LogoutView):
    """Sign out here and, for a single sign-on session, at the identity provider too."""

    def post(self, request, *args, **kwargs):
        id_token = request.session.get("oidc_id_token")
        response = super().post(request, *args, **kwargs)
        url = oidc.end_session_url(request, id_token)
        return HttpResponseRedirect(url) if url else response
