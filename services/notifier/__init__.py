"""The Telegram notifier: fills, trading-state changes, alerts, restarts and a daily report, to a phone."""
