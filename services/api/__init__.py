"""API: REST and Prometheus views over the SQLite database, served by gunicorn."""
