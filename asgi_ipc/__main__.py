"""``python -m asgi_ipc``: the same as the ``asgi-ipc`` command."""

from .cli import main

raise SystemExit(main())
