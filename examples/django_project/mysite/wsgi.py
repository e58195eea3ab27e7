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

application = Comet(get_wsgi_application(),
                    store=os.environ.get("COMET_STORE", "sqlite:///chat.db"))
application.channel("chat")
