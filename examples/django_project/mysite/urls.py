from django.contrib.auth.views import LoginView
from django.urls import path

from . import views

urlpatterns = [
    path("", views.chat),
    path("login", LoginView.as_view()),
    path("hello", views.hello),
]
