"""Strategy: book imbalance signals turned into orders sent to risk."""
