from django.contrib.auth import get_user_model
from django.core.management.base import CommandError


def operator_user(username: str | None = None):
    """The user whose access a command acts with: a named user, or an unsaved superuser for the operator
    (whoever can run manage.py already has the database credentials)."""
    User = get_user_model()
    if username:
        user = User.objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No user {username!r}.")
        return user
    return User(username="manage.py", is_staff=True, is_superuser=True, is_active=True)
