"""The WSGI application: Django, with comet.py in front of it.

    python manage.py runserver           # serves it (WSGI_APPLICATION)
    gunicorn -k gthread --threads 50 mysite.wsgi
"""
import os

from django.core.wsgi import get_wsgi_application

from comet import Comet

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

application = Comet(get_wsgi_application(),
                    store=os.environ.get("COMET_STORE", "sqlite:///chat.db"))
application.channel("chat")
