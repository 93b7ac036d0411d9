"""``python -m asgi_ipc.bench``: the same as ``asgi-ipc bench``."""

from . import main

raise SystemExit(main())
