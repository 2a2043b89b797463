"""The notifier: tails the event streams and fans events out to live subscribers.

One notifier runs in every api process. It reads the Redis Streams the outbox
relay writes (``<namespace>:events:<channel>``) with plain XREAD, so every
process sees every event and any process can serve any client; per-client
cursors make delivery exactly-once and in order per channel, and a client that
reconnects with the last id it saw is replayed what it missed.
"""
