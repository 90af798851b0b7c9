"""The OFI strategy's signal: a score from one book's features, the `Signal` record and its `signals` row.

The features are services/strategy/features.py's, with `FeatureParams` from the QF_STRATEGY_*
settings (`feature_params`). The score uses the first (fastest) window w0 of QF_STRATEGY_WINDOWS_MS:

    c_ofi   = tanh(ofi_multi[w0] / OFI_SCALE)         multi-level OFI, in average level depths
    c_l1    = tanh(ofi_l1[w0] / OFI_L1_SCALE)         best-level OFI, in base quantity
    c_flow  = trade_flow[w0]                          in [-1, 1]
    c_depth = depth_imbalance                         top-N, in [-1, 1]
    c_micro = clamp(microprice_dev_bps / (spread_bps / 2), -1, 1)   = (qb1 - qa1) / (qb1 + qa1):
              where the microprice sits inside the spread (0 when the spread is 0)
    score   = (W_OFI c_ofi + W_OFI_L1 c_l1 + W_FLOW c_flow + W_DEPTH c_depth + W_MICRO c_micro)
              / (W_OFI + W_OFI_L1 + W_FLOW + W_DEPTH + W_MICRO)                in [-1, 1]
    regime  = ready and spread_ratio <= MAX_SPREAD_RATIO and VOL_MIN_BPS <= vol_1s * 1e4 <= VOL_MAX_BPS
    side    = BUY if regime and score >= ENTRY_SCORE; SELL if regime and score <= -ENTRY_SCORE; else flat
    confidence = |score| with a side, 0 when flat

(Why these terms: over the shipped capture each one correlates positively with the mid's move over
the next 2-10 s, depth imbalance and the microprice most (~0.3 at 2 s), OFI next (~0.2), trade
flow least (~0.1); none by nearly enough to pay 20 bps of fees a round trip.)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from services.strategy._cfeatures import Scorer as _CScorer, bind_score
from services.strategy.features import FeatureParams, FeatureVector
from shared.config import StrategyConfig, numbers
from shared.errors import ConfigError
from shared.enums import Side

NOT_READY, FILTERED = "not_ready", "filtered"  # why a score gives no side besides its size
bind_score(Side.BUY, Side.SELL, NOT_READY, FILTERED)


@dataclass(frozen=True, slots=True)
class Signal:
    """What the strategy concluded from a book: published on `signal.{SYMBOL}`, stored in `signals`."""
    symbol: str
    ts: int
    side: Side | None
    confidence: float
    score: float
    features: dict[str, float]  # name -> value (the flattened FeatureVector, e.g. "ofi_multi_1000ms")
    update_id: int
    recv_ts: int
    client_order_id: str = ""  # the order it triggered ("" if none)
    action: str = ""  # "entry" | "exit:<why>" | "" (a side change only)


class Scorer:
    """The module docstring's score, regime, side and confidence, for one book's features.
    Raises ConfigError at construction when no weight is positive (shared.config.load refuses that
    configuration first). `score(features)` is the same
    answer computed in C straight from a SymbolFeatures (no head tuple: the per-book path);
    `__call__(head)` is its Python reference (tests/services/strategy/test_cfeatures.py: equal
    bit for bit)."""
    __slots__ = ("w_ofi", "w_l1", "w_flow", "w_depth", "w_micro", "wsum", "ofi_scale", "l1_scale", "entry",
                 "max_spread_ratio", "vol_min", "vol_max", "score")

    def __init__(self, cfg: StrategyConfig) -> None:
        self.w_ofi, self.w_l1, self.w_flow, self.w_depth, self.w_micro = (
            cfg.w_ofi, cfg.w_ofi_l1, cfg.w_flow, cfg.w_depth, cfg.w_micro)
        self.wsum = cfg.w_ofi + cfg.w_ofi_l1 + cfg.w_flow + cfg.w_depth + cfg.w_micro
        if self.wsum <= 0:
            raise ConfigError("QF_STRATEGY_W_OFI, _W_OFI_L1, _W_FLOW, _W_DEPTH, _W_MICRO: at least one score "
                              "weight must be positive (all are 0)")
        self.ofi_scale, self.l1_scale = cfg.ofi_scale, cfg.ofi_l1_scale
        self.entry, self.max_spread_ratio = cfg.entry_score, cfg.max_spread_ratio
        self.vol_min, self.vol_max = cfg.vol_min_bps, cfg.vol_max_bps
        # score(features) -> (score, side, confidence, why, mid, vol_1s)
        self.score = _CScorer(self).score

    def __call__(self, head: tuple) -> tuple[float, Side | None, float, str]:
        """`head` (SymbolFeatures.head()) -> (score, side, confidence, why): why is "" when the
        regime is open, NOT_READY or FILTERED when it is not (then no side)."""
        _mid, ofi_l1, ofi_multi, flow, depth, micro_dev, spread, vol_1s, spread_ratio, ready = head
        micro = micro_dev / (0.5 * spread) if spread > 0 else 0.0
        if micro > 1.0:
            micro = 1.0
        elif micro < -1.0:
            micro = -1.0
        score = (self.w_ofi * math.tanh(ofi_multi / self.ofi_scale) + self.w_l1 * math.tanh(ofi_l1 / self.l1_scale)
                 + self.w_flow * flow + self.w_depth * depth + self.w_micro * micro) / self.wsum
        if not ready:
            return score, None, 0.0, NOT_READY
        vol_bps = vol_1s * 1e4
        if spread_ratio > self.max_spread_ratio or not self.vol_min <= vol_bps <= self.vol_max:
            return score, None, 0.0, FILTERED
        if score >= self.entry:
            return score, Side.BUY, min(score, 1.0), ""
        if score <= -self.entry:
            return score, Side.SELL, min(-score, 1.0), ""
        return score, None, 0.0, ""


def feature_params(cfg: StrategyConfig) -> FeatureParams:
    """The features' parameters from the QF_STRATEGY_* settings."""
    return FeatureParams(levels=cfg.levels, windows_ms=numbers(cfg.windows_ms, int), vol_tau_s=cfg.vol_tau_s,
                         horizons_s=numbers(cfg.horizons_s, float), spread_tau_s=cfg.spread_tau_s)


def feature_names(params: FeatureParams) -> tuple[str, ...]:
    """The keys of a Signal's `features`, in order."""
    ws = [f"{w}ms" for w in params.windows_ms]
    hs = [f"{h:g}s" for h in params.horizons_s]
    return ("mid", "spread_bps", *(f"ofi_l1_{w}" for w in ws), *(f"ofi_multi_{w}" for w in ws), "depth_imbalance",
            "microprice_dev_bps", *(f"trade_flow_{w}" for w in ws), "vol", "vol_1s", *(f"momentum_{h}" for h in hs),
            "spread_ratio")


def flatten(v: FeatureVector, names: tuple[str, ...]) -> dict[str, float]:
    """A FeatureVector as `feature_names` -> float."""
    values = (v.mid, v.spread_bps, *v.ofi_l1, *v.ofi_multi, v.depth_imbalance, v.microprice_dev_bps, *v.trade_flow,
              v.vol, v.vol_1s, *v.momentum, v.spread_ratio)
    return dict(zip(names, values))


def signal_params(sig: Signal) -> tuple:
    """`sig` as the parameters of shared.db.SIGNAL_INSERT (SIGNAL_COLS' order); non-finite feature
    values are stored as null (JSON has no NaN)."""
    feats = {k: (v if math.isfinite(v) else None) for k, v in sig.features.items()}
    return (sig.ts, sig.symbol, sig.side.value if sig.side is not None else "FLAT", float(sig.confidence),
            float(sig.score), json.dumps(feats, separators=(",", ":"), allow_nan=False), sig.update_id, sig.recv_ts,
            sig.client_order_id, sig.action)
