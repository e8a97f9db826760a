"""The rooms of `pricewatch.store` (the entry point: `Store` composes these).

`base` the connections, transactions and errors · `accounts` settings, users, login
addresses and refresh tokens · `alerts` alerts, events and triggers · `deliveries`
notification channels and the delivery outbox · `market` quotes, admin feeds and candles ·
`backup` the `backup` command's online copy (a process of its own, beside the server).
Only these modules hold SQL (DDL: schema.py).
"""
