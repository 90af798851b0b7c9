"""Market data: Binance order books kept in sync, their metrics, and capture files."""
