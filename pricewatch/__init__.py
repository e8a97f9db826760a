"""pricewatch: a self-hosted crypto price server in one asyncio process."""

__version__ = "0.1.0"
