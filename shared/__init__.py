"""QuantumFlow's shared library: messages, config, ZeroMQ helpers, database models, logging."""
