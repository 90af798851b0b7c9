"""`qf backtest`: the live services cores in one process, driven by a captures recorded time."""
