from django.urls import path

from . import oidc

# Names as mozilla-django-oidc expects them (its callback view reverses "oidc_authentication_callback").
urlpatterns = [
    path("authenticate/", oidc.AuthenticationRequestView.as_view(), name="oidc_authentication_init"),
    path("callback/", oidc.AuthenticationCallbackView.as_view(), name="oidc_authentication_callback"),
]
