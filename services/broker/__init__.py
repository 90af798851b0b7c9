"""Paper broker: order state machine, book-walking fills, fees, the SQLite writes of orders and fills."""
