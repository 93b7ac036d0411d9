"""WebSocket routes. Room names are limited to what a channel-layer group name may contain."""

from django.urls import re_path

from . import consumers

websocket_urlpatterns = [
    re_path(r"^ws/chat/(?P<room_name>[A-Za-z0-9_-]{1,50})/$", consumers.RoomConsumer.as_asgi()),
]
