"""Who is who for comet.py: the logged-in Django user of a raw WSGI request.

comet.py answers its own paths before Django runs, so no middleware has set
``request.user``: these hooks read the session cookie as SessionMiddleware would
and ask ``get_user`` as AuthenticationMiddleware would.
"""
from importlib import import_module

from django.conf import settings
from django.contrib.auth import get_user
from django.http import HttpRequest, parse_cookie

SessionStore = import_module(settings.SESSION_ENGINE).SessionStore


def user_of(environ):
    """The request's user (AnonymousUser when not logged in), looked up once per request."""
    if "mysite.user" not in environ:
        request = HttpRequest()
        cookies = parse_cookie(environ.get("HTTP_COOKIE", ""))
        request.session = SessionStore(cookies.get(settings.SESSION_COOKIE_NAME))
        environ["mysite.user"] = get_user(request)
    return environ["mysite.user"]


def user_id(environ):
    """The id hook: the user's primary key; None (403) for anonymous requests."""
    return user_of(environ).pk


def user_name(environ, db):
    """The sender hook: the name the user shows to others."""
    user = user_of(environ)
    return user.get_full_name() or user.get_username()


def in_group(environ, db, channel):
    """Who may join group:NAME: the members of the Django group NAME."""
    return user_of(environ).groups.filter(name=channel[len("group:"):]).exists()
