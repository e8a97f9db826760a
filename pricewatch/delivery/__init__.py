"""Delivery of alert events to the channels their owners chose: email, webhooks, Telegram.

`outbox.Deliverer` is the one mechanics (claims due rows of `deliveries`, bounded
concurrency per channel type, retries with backoff, the hourly budget and its digests,
exactly-once records); each channel is a sink that only transports (`base.Sink`):
`email.EmailSink` (SMTP, persistent connections), `webhook.WebhookSink` (signed POSTs),
`telegram.TelegramSink` (Bot API). `message` renders the text every channel shares.
"""
