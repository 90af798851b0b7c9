"""Paper broker: the FillModel (latency, book walking, queues, fees), the order state machine, its SQLite writes."""
