"""HTTP routes of the example chat site."""

from chat import views
from django.urls import path, re_path

urlpatterns = [
    path("", views.index, name="index"),
    re_path(r"^chat/(?P<room_name>[A-Za-z0-9_-]{1,50})/$", views.room, name="room"),
]
