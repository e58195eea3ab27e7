#!/usr/bin/env python
"""Django's command line.  From the repository root (PYTHONPATH=. finds comet.py there)::

    PYTHONPATH=. python examples/django_project/manage.py migrate
    PYTHONPATH=. python examples/django_project/manage.py runserver 127.0.0.1:8000
"""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
