from django.contrib.auth import get_user_model
from django.core.management.base import CommandError
from django.utils.translation import gettext


def operator_user(username: str | None = None):
    """The user whose access a command acts with: a named user, or an unsaved superuser for the operator
    (whoever can run manage.py already has the database credentials)."""
    User = get_user_model()
    if username:
        user = User.objects.filter(username=username).first()
        if user is None:
            raise CommandError(gettext("No user %(username)r.") % {"username": username})
        return user
    return User(username="manage.py", is_staff=True, is_superuser=True, is_active=True)
