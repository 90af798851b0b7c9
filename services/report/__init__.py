"""`qf report`: charts and a summary table of the trading so far, from a database, the API or its CSV export."""
