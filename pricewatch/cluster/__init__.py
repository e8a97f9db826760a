"""Several processes or machines: a core and stateless edges over Redis (CONTRACT "Several
machines"). bus.py carries the messages, core.py says what the core publishes, edge.py
what an edge applies. Nothing here imports `redis` unless PRICEWATCH_REDIS_URL is set."""
