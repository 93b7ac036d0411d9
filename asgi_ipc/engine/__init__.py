"""The store's engine: everything that lives in the shared-memory segment, with no asyncio and
no sockets."""
