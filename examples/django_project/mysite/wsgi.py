"""The WSGI application: Django, with comet.py in front of it.

    PYTHONPATH=. python examples/django_project/manage.py runserver 127.0.0.1:8000
    PYTHONPATH=examples/django_project gunicorn -k gthread --threads 50 -b 127.0.0.1:8000 mysite.wsgi

(from the repository root: runserver serves it as WSGI_APPLICATION; gunicorn
finds comet.py in the working directory).
"""
import os

from django.core.wsgi import get_wsgi_application

from comet import Comet

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
django_application = get_wsgi_application()     # sets Django up: the hooks below use its ORM

from mysite.users import in_group, user_id, user_name  # noqa: E402

application = Comet(django_application, id=user_id, sender=user_name,
                    store=os.environ.get("COMET_STORE", "sqlite:///chat.db"))
application.channel("chat")
application.channels("group:", may_join=in_group)
