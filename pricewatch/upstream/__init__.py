"""Where market data and quotes come from: every client of an outside service.

`pricewatch.feeds` is the entry point all of these build on (the Tick/Book types, the Feed
base, health counters, Binance's wire format); nothing in it imports this package.

- `binance`: the Binance websocket feed (spot and futures), supervised.
- `binance_rest`: Binance REST market data (trades, aggregate trades, klines) with
  Retry-After obeyed, and the table of markets.
- `backfill`: the trade sequencer that fills gaps in trade ids over REST.
- `history`: candle history from REST klines at start.
- `offline`: the demo random walk and the replay of recorded files.
- `alphavantage`: the AlphaVantage quote client and poller.
- `demo_quotes`: offline quotes from the latest market price (PRICEWATCH_QUOTES=demo).
- `factory`: `make_feed`, the feed PRICEWATCH_FEED names.
"""
