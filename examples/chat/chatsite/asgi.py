"""The ASGI application of the example chat site, for daphne, uvicorn and runworker alike.

``http`` serves the pages, ``websocket`` the rooms, and ``channel`` routes messages arriving on
named channels to background consumers, which is what ``manage.py runworker`` runs.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")

# Django must be set up before the consumers (and the models they could import) are loaded.
django_asgi_app = get_asgi_application()

from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from chat.consumers import ShoutWorker  # noqa: E402
from chat.routing import websocket_urlpatterns  # noqa: E402
from django.conf import settings  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Refuses WebSockets opened by pages of other sites (cross-site WebSocket hijacking).
        "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
        "channel": ChannelNameRouter({settings.CHAT_WORKER_CHANNEL: ShoutWorker.as_asgi()}),
    }
)
