"""``asgi-ipc bench``: asgi_ipc measured against its peers (channels_redis's two layers and
channels-nats, against servers the run starts) and Channels' InMemoryChannelLayer on this
machine, in one run, so that the ratios compare like with like.

The package, one concern a module:

  command.py       the command line: options, the run, the report on stdout
  workloads.py     what is measured (the workloads, their scales) and the run through them
  roles.py         the cross-process halves of the workloads, run in worker processes
  pool.py          the worker processes, started once and reused
  server.py        a throw-away server on a free loopback port, always stopped
  redis_server.py  the redis-server channels_redis's two layers run against
  nats_server.py   the nats-server channels-nats runs against
  layers.py        the backends under test and the messages they carry
  report.py        the rows and the table
  targets.py       the project's targets: the one table the report and the README read

asgi_ipc is reached only through its public names: ``IPCChannelLayer``, ``asgi_ipc.unlink``
and ``asgi_ipc.observe.figures`` (the store's own accounting, for the memory figures).
"""

from .command import main

__all__ = ["main"]
