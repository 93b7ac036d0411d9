"""The chat app: room pages, the room WebSocket consumer and the shouting worker."""
