"""`make bench`: run every benchmark, print its figures, merge them into bench/results.json.

`python -m bench.run [name ...]` runs only the named benchmarks."""
from __future__ import annotations

import json
import os
import sys
import time

from bench import api, backtest, broker, compose, marketdata, md_many, md_rss, report, risk, strategy, tick_to_trade
from bench import uvloop as uvloop_bench  # aliased: a bare `uvloop` would read as the package

BENCHMARKS = {
    "tick_to_trade": tick_to_trade.run,
    "broker": broker.run,
    "marketdata": marketdata.run,
    "compose": compose.run,
    "md_rss": md_rss.run,
    "md_many": md_many.run,
    "risk": risk.run,
    "backtest": backtest.run,
    "strategy": strategy.run,
    "api": api.run,
    "report": report.run,
    "uvloop": uvloop_bench.run,
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    try:
        with open(RESULTS) as f:
            results = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        results = {}
    for name in names:
        print(f"== {name}", flush=True)
        start = time.monotonic()
        figures = BENCHMARKS[name]()
        for key, value in figures.items():
            print(f"{key:<32} {value}")
        print(f"({time.monotonic() - start:.1f} s)", flush=True)
        results.update(figures)
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
