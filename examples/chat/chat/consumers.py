"""The room WebSocket consumer and the background worker it talks to.

Each WebSocket joins the group ``room-<name>``. Whatever a client says goes to the group, so every
client in the room gets it, whichever server process it is connected to: the channel layer is the
only thing the processes share. A ``shout`` is handed to the worker process on the named channel
``chat-worker`` together with this consumer's own channel name, and the worker's reply comes back
on that channel to this consumer alone.

Client to server (JSON)::

    {"command": "say", "text": "hi", "author": "ann"}
    {"command": "shout", "text": "hi"}

Server to client: ``welcome`` once, then ``message``, ``shout`` and ``error`` objects.
"""

import json
import os
import re

from channels.consumer import AsyncConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

ROOM_NAME = re.compile(r"[A-Za-z0-9_-]{1,50}")
MAX_TEXT = 500
MAX_AUTHOR = 40


def _clean(value, limit):
    """The trimmed text of ``value``, cut to ``limit`` characters, if it is a non-empty string;
    else None."""
    if not isinstance(value, str):
        return None
    value = value.strip()[:limit]
    return value or None


class RoomConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        self.room = self.scope["url_route"]["kwargs"]["room_name"]
        self.group = f"room-{self.room}"
        # Joining before accepting means that a client which sees the welcome already gets every
        # message of the room sent after it.
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json({"type": "welcome", "room": self.room, "server_pid": os.getpid()})

    async def disconnect(self, code):
        # Without this the layer would keep delivering the room's messages to a channel nobody
        # reads until the membership expired.
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs):
        if not isinstance(content, dict):
            await self.send_error("send a JSON object")
            return
        command = content.get("command")
        text = _clean(content.get("text"), MAX_TEXT)
        if command not in ("say", "shout"):
            await self.send_error(f"unknown command {command!r}")
        elif text is None:
            await self.send_error("text must be a non-empty string")
        elif command == "say":
            await self.channel_layer.group_send(
                self.group,
                {
                    "type": "chat.message",
                    "text": text,
                    "author": _clean(content.get("author"), MAX_AUTHOR) or "anonymous",
                    "server_pid": os.getpid(),
                },
            )
        else:
            await self.channel_layer.send(
                settings.CHAT_WORKER_CHANNEL,
                {"type": "shout.request", "text": text, "reply_channel": self.channel_name},
            )

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        # The JSON base class would let a binary or malformed frame end the connection with an
        # exception; a chat client deserves an answer instead.
        try:
            content = json.loads(text_data) if text_data is not None else None
        except ValueError:
            content = None
        if content is None:
            await self.send_error("frames must be JSON text")
        else:
            await self.receive_json(content)

    async def send_error(self, reason):
        await self.send_json({"type": "error", "reason": reason})

    async def chat_message(self, event):
        await self.send_json(
            {
                "type": "message",
                "text": event["text"],
                "author": event["author"],
                "server_pid": event["server_pid"],
            }
        )

    async def shout_reply(self, event):
        await self.send_json(
            {
                "type": "shout",
                "text": event["text"],
                "count": event["count"],
                "worker_pid": event["worker_pid"],
            }
        )


class ShoutWorker(AsyncConsumer):
    """Upper-cases shouts and counts them; runs in ``manage.py runworker chat-worker``.

    The count lives in this process, so a reply's count and pid show which worker did the work.
    """

    shouts = 0

    async def shout_request(self, message):
        type(self).shouts += 1
        await self.channel_layer.send(
            message["reply_channel"],
            {
                "type": "shout.reply",
                "text": message["text"].upper(),
                "count": type(self).shouts,
                "worker_pid": os.getpid(),
            },
        )
