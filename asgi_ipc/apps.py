"""Django app of asgi_ipc: add ``"asgi_ipc"`` to INSTALLED_APPS to have ``manage.py check``
validate every asgi_ipc layer in CHANNEL_LAYERS (see ``checks.py``). The layer works without it."""

from django.apps import AppConfig


class AsgiIpcConfig(AppConfig):
    name = "asgi_ipc"
    verbose_name = "asgi_ipc channel layer"

    def ready(self) -> None:
        from . import checks

        checks.register()
