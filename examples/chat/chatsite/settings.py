"""Settings of the example chat site.

Every server process and the worker must use the same layer prefix to share channels and groups;
it comes from ``CHAT_LAYER_PREFIX`` so that several copies of the site (or test runs) can live on
one machine without seeing each other's messages.
"""

import os

SECRET_KEY = os.environ.get("CHAT_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("CHAT_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    # channels provides the runworker command.
    "channels",
    # asgi_ipc's system check: `manage.py check` (and runworker, which runs the checks first)
    # reports a layer that would be refused before any WebSocket meets it.
    "asgi_ipc",
    "chat",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "chatsite.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]

ASGI_APPLICATION = "chatsite.asgi.application"

# Nothing is stored: the site keeps no models, and the layer keeps its state in shared memory.
DATABASES = {}

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "asgi_ipc.IPCChannelLayer",
        "CONFIG": {"prefix": os.environ.get("CHAT_LAYER_PREFIX", "chat")},
    }
}
# On several machines: the same site, each machine's processes sharing its own store, the
# machines joined by Redis (pip install 'asgi_ipc[redis]').
if os.environ.get("CHAT_REDIS_URL"):
    CHANNEL_LAYERS["default"]["BACKEND"] = "asgi_ipc.MultiHostChannelLayer"
    CHANNEL_LAYERS["default"]["CONFIG"]["hosts"] = [os.environ["CHAT_REDIS_URL"]]

# The channel the shouting worker listens on (``manage.py runworker chat-worker``).
CHAT_WORKER_CHANNEL = "chat-worker"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("CHAT_LOG_LEVEL", "WARNING")},
}
