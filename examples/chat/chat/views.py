"""Pages of the example chat site: a room picker and the room itself."""

import os

from django.shortcuts import redirect, render

from .consumers import ROOM_NAME


def index(request):
    room = request.GET.get("room", "").strip()
    if ROOM_NAME.fullmatch(room):
        return redirect("room", room_name=room)
    return render(request, "chat/index.html", {"invalid": bool(room)})


def room(request, room_name):
    return render(request, "chat/room.html", {"room_name": room_name, "server_pid": os.getpid()})
