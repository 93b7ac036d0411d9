"""A scripted client of the chat site: joins a room, says (or shouts) one line, and prints every
message it receives until the answer to its own comes back.

    python client.py [--server http://127.0.0.1:8001] [--room lobby] [--author NAME] [--shout] TEXT

The site takes WebSockets only from its own pages (``AllowedHostsOriginValidator`` in
``chatsite/asgi.py``): a handshake without an ``Origin`` header, or with one whose host is not in
``ALLOWED_HOSTS``, is refused with HTTP 403. A browser sends the page's origin by itself; a script
must send it, as this one does (the server's own address).
"""

import argparse
import asyncio
import json
import sys
from urllib.parse import urlsplit

import websockets

REPLY_TIMEOUT = 10


async def run(server: str, room: str, author: str, text: str, shout: bool) -> int:
    address = urlsplit(server)
    scheme = "wss" if address.scheme == "https" else "ws"
    url = f"{scheme}://{address.netloc}/ws/chat/{room}/"
    async with websockets.connect(url, origin=f"{address.scheme}://{address.netloc}") as ws:
        print(await ws.recv())  # the welcome: which server process holds this WebSocket
        command = "shout" if shout else "say"
        await ws.send(json.dumps({"command": command, "text": text, "author": author}))
        # A said line comes back to its sender too, as a member of the room; a shout is answered
        # to the sender alone. Others' messages of the room may arrive first.
        while True:
            try:
                frame = await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT)
            except asyncio.TimeoutError:
                print(f"no answer within {REPLY_TIMEOUT} s (is the worker running?)",
                      file=sys.stderr)
                return 1
            print(frame)
            message = json.loads(frame)
            if message["type"] == "error":
                return 1
            if message["type"] == ("shout" if shout else "message") and (
                shout or (message["author"], message["text"]) == (author, text.strip())
            ):
                return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text")
    parser.add_argument("--server", default="http://127.0.0.1:8001")
    parser.add_argument("--room", default="lobby")
    parser.add_argument("--author", default="script")
    parser.add_argument("--shout", action="store_true", help="have the worker shout it back")
    args = parser.parse_args()
    return asyncio.run(run(args.server, args.room, args.author, args.text, args.shout))


if __name__ == "__main__":
    sys.exit(main())
