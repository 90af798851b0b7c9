"""Pre-trade risk: trading state, limits, positions and P&L as risk sees them."""
