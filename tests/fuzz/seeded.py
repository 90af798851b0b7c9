"""Seeded fuzz runs: the seed and scale from the environment, counts per input class, the report, hostile values.

`make test` runs every fuzz file with the same fixed seed (DEFAULT_SEED), so a run is
repeatable and a failure in CI is a failure on every machine. QF_FUZZ_SEED=<int> runs
another seed, QF_FUZZ_SEED=random a fresh one (printed first, and named in every failure,
so it can be replayed). QF_FUZZ_SCALE=<float> multiplies every input count (1 = the
default, bounded run of `make test`). Each run writes its counts to build/fuzz/<name>.json
and prints them."""
from __future__ import annotations

import json
import os
import random
import time
from collections import Counter

from tests.conftest import ROOT

# Money strings a hostile or broken peer sends: beyond the wire's bounds, off the 1e-8 grid,
# not numbers at all, and a few sane ones so that mutated messages still get through sometimes.
HOSTILE_DECIMALS = ["9e999999", "-9e999999", "1e-999999", "0E-999999", "1e30", "1e29", "-1", "-0", "0", "NaN",
                    "-nan", "sNaN", "Infinity", "-Infinity", "1e-30", "0.000000001", "1e13", "1e15", "1e16",
                    "9" * 40, "9" * 65, "1" * 25 + ".5", " 1", "1_000", "0x10", "", "１", "1e12", "0.001",
                    "0.00100000", "100.5", "1E+2"]
HOSTILE_FLOATS = [float("nan"), float("inf"), float("-inf"), 1e-300, 1e300, 5e-324, 1.7976931348623157e308, -0.0,
                  0.0, -1.0, 4e-9, 1e15, 1e16, 2.0**63, 100.0, 100.5]
HOSTILE_INTS = [-(2**63), -1, 0, 2**63 - 1, 2**64 - 1, 10**13 + 1]
HOSTILE_STRINGS = ["", "BTCUSDT\x00", "btcusdt", "DOGEUSDT", "ÉTHUSDT", "x" * 129, "x" * 10_000, "🚀", "BUY ",
                   "SELL\n", "LIMIT", "IOC"]
HOSTILE_VALUES = [None, True, 1.5, float("nan"), -1, 2**63, -(2**63), b"bytes", [], {}, [1, [2]],
                  {"a": {"b": {}}}, "0.001", 0, [[1.0, 2.0]], [[1.0]], [["1", "2"]]]


DEFAULT_SEED = 11  # issue #11, where these suites come from


def seed_and_scale() -> tuple[int, float]:
    """(seed, scale) from QF_FUZZ_SEED / QF_FUZZ_SCALE (see the module's docstring)."""
    raw = os.environ.get("QF_FUZZ_SEED", "").strip()
    seed = random.SystemRandom().randrange(2**32) if raw == "random" else int(raw) if raw else DEFAULT_SEED
    scale = float(os.environ.get("QF_FUZZ_SCALE", "1") or 1)
    if not scale > 0:
        raise ValueError(f"QF_FUZZ_SCALE must be > 0, got {scale}")
    return seed, scale


def write_report(name: str, report: dict) -> None:
    """Write `report` to build/fuzz/<name>.json and print it."""
    folder = os.path.join(ROOT, "build", "fuzz")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"fuzz {name}: {json.dumps(report, sort_keys=True)}")


class FuzzRun:
    """One seeded run: `rng`, `n(base)` scaled input counts, `count(cls)` per input class,
    `why(text)` for assertion messages (with the seed), `report()` at the end."""

    def __init__(self, name: str) -> None:
        self.seed, self.scale = seed_and_scale()
        self.name = name
        self.rng = random.Random(self.seed)
        self.counts: Counter[str] = Counter()
        self.started = time.monotonic()
        # printed now: pytest shows a failing test's output, so the seed is there to replay it
        print(f"fuzz {name}: seed={self.seed} scale={self.scale} (QF_FUZZ_SEED={self.seed} replays it)")

    def n(self, base: int) -> int:
        return max(1, int(base * self.scale))

    def count(self, cls: str, k: int = 1) -> None:
        self.counts[cls] += k

    def why(self, text: str) -> str:
        return f"{text} [fuzz {self.name} seed={self.seed}: QF_FUZZ_SEED={self.seed} replays it]"

    def report(self, **extra) -> dict:
        """Write build/fuzz/<name>.json (counts per class, seed, scale, seconds) and print it."""
        out = {"seed": self.seed, "scale": self.scale, "seconds": round(time.monotonic() - self.started, 1),
               "inputs": sum(v for k, v in self.counts.items() if not k.startswith("answer.")),
               "counts": dict(sorted(self.counts.items())), **extra}
        write_report(self.name, out)
        return out


def hostile_value(rng: random.Random) -> object:
    """Any one hostile value: a decimal string, a float, an int, a string or an odd shape."""
    pool = rng.choice((HOSTILE_DECIMALS, HOSTILE_FLOATS, HOSTILE_INTS, HOSTILE_STRINGS, HOSTILE_VALUES))
    return rng.choice(pool)


def mutate(rng: random.Random, wire: dict, n: int = 1) -> dict:
    """`wire` with `n` of its fields replaced by hostile values, dropped, or an unknown one added."""
    out = dict(wire)
    for _ in range(n):
        roll = rng.random()
        key = rng.choice(list(out)) if out else "x"
        if roll < 0.1:
            out.pop(key, None)
        elif roll < 0.15:
            out[f"x{rng.randrange(100)}"] = hostile_value(rng)
        else:
            out[key] = hostile_value(rng)
    return out
