"""Settings of the example project: what `django-admin startproject` writes, trimmed.

Django's default middleware stays on, CSRF included: comet.py sits in front of
Django (see wsgi.py), so its push never reaches CsrfViewMiddleware; it has
checks of its own (Content-Type: application/json, and the Origin).
"""
import os
import urllib.parse
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "django-insecure-change-me"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "mysite.urls"
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates",
              "DIRS": [BASE_DIR / "mysite" / "templates"]}]       # registration/login.html
LOGIN_URL = "/login"
LOGIN_REDIRECT_URL = "/"
WSGI_APPLICATION = "mysite.wsgi.application"      # runserver serves it, comet.py included

DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                         "NAME": os.environ.get("DJANGO_DB", BASE_DIR / "db.sqlite3")}}

# COMET_STORE=postgresql://USER:PASS@HOST:PORT/DB puts Django's own tables in that database too.
_store = urllib.parse.urlsplit(os.environ.get("COMET_STORE", ""))
if _store.scheme in ("postgresql", "postgres"):
    DATABASES["default"] = {"ENGINE": "django.db.backends.postgresql", "NAME": _store.path[1:],
                            "USER": _store.username, "PASSWORD": _store.password,
                            "HOST": _store.hostname, "PORT": _store.port}
USE_TZ = True
