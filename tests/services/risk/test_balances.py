"""The spot account (issue #13): balances per asset, what working orders reserve, INSUFFICIENT_BALANCE,
UNSUPPORTED_MARKET, the same account after a restart, and risk, ledger and broker agreeing on base fees."""
from __future__ import annotations

from decimal import Decimal as D
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from services.broker.core import Account
from services.risk import store
from services.risk.balances import (Balances, FeeRates, Pricing, assets_of, band_of, is_spot, parse_balances,
                                    start_balances)
from services.risk.checks import TEXTS, Reason, SymbolRules
from services.risk.core import UNCERTAIN_NS, Approval, Denial, OpenOrder, RiskEngine
from services.risk.limits import RiskLimits, from_config
from shared.config import load
from shared.db import FillRow, OrderRow, close_db, init_db
from shared.enums import OrderKind, OrderStatus, Side, TimeInForce
from shared.messages import OrderRequest

S = 1_000_000_000
T0 = 1_700_000_000 * S
TICK, LOT = D("0.5"), D("0.001")
FEES = FeeRates(taker=D("0.001"), maker=D("0.0005"))
SYMBOLS = ("BTCUSDT", "ETHUSDT")


def rules(symbol: str) -> SymbolRules:
    return SymbolRules(symbol, lot_size=LOT, tick_size=TICK, min_notional=D(0), max_order_notional=D("1e6"),
                       max_position=D("1e6"), max_notional=D("1e9"))


def limits(*symbols: str, band: str = "100") -> RiskLimits:
    return RiskLimits(rules={s: rules(s) for s in symbols or SYMBOLS}, stale_book_ms=10**6, max_open_orders=1000,
                      price_band_bps=D(band), orders_per_s=10**6, orders_per_min=10**8, daily_loss=D(0),
                      daily_loss_soft=D(0), max_drawdown=D(0), drawdown_soft=D(0), adjust=False)


def engine(balances: dict, fees: FeeRates = FEES, lim: RiskLimits | None = None) -> RiskEngine:
    eng = RiskEngine(lim or limits(), D("1000"), start_balances={a: D(v) for a, v in balances.items()}, fees=fees)
    for symbol in eng.limits.rules:
        eng.on_book(symbol, 100.0, T0)
    return eng


def order(coid: str, side: Side, qty: str, price: str | None = None, symbol: str = "BTCUSDT",
          tif: TimeInForce = TimeInForce.GTC) -> OrderRequest:
    return OrderRequest(ts=T0, client_order_id=coid, strategy="s", symbol=symbol, side=side,
                        kind=OrderKind.MARKET if price is None else OrderKind.LIMIT, qty=D(qty),
                        price=None if price is None else D(price), tif=tif)


def fill(fill_id: str, coid: str, side: Side, qty: str, price: str, fee: str = "0", fee_asset: str = "USDT",
         symbol: str = "BTCUSDT") -> dict:
    return {"fill_id": fill_id, "client_order_id": coid, "symbol": symbol, "side": side.value, "price": price,
            "qty": qty, "fee": fee, "fee_asset": fee_asset, "ts": T0}


def send(eng: RiskEngine, req: OrderRequest, now: int = T0) -> Approval | Denial:
    """What the desk does: check, and track an approved order as sent (priced as it reserves)."""
    verdict = eng.check(req, now)
    if type(verdict) is Approval:
        eng.on_sent(req.client_order_id, req.symbol, req.side, verdict.qty,
                    req.kind is OrderKind.LIMIT and req.tif.rests, now, req.price)
    return verdict


# -- the pure pieces ------------------------------------------------------------------------

def test_what_one_unit_of_an_order_reserves():
    unit = Pricing(FEES, D(100), ["BTCUSDT"]).unit
    assert unit("BTCUSDT", Side.SELL, D("100"), D("100")) == ("BTC", D(1))
    assert unit("BTCUSDT", Side.SELL, None, None) == ("BTC", D(1))  # no price needed
    # a LIMIT BUY: its price plus the larger fee rate (a crossing LIMIT pays the taker's)
    assert unit("BTCUSDT", Side.BUY, D("100.5"), D("100")) == ("USDT", D("100.6005"))
    # a MARKET BUY: the mid, the band beyond it, the taker fee
    assert unit("BTCUSDT", Side.BUY, None, D("100")) == ("USDT", D("101.101"))
    # 0.03333333 × 1.0007 × 1.001 = 0.033390019994331: up to the next 1e-12, never down
    assert Pricing(FEES, D(7)).unit("ETHBTC", Side.BUY, None, D("0.03333333")) == ("BTC", D("0.033390019995"))
    received = Pricing(FeeRates(D("0.001"), D("0.0005"), "received"), D(100))  # a BUY's fee: out of the base
    assert received.unit("BTCUSDT", Side.BUY, D("100.5"), D("100")) == ("USDT", D("100.5"))
    assert received.unit("BTCUSDT", Side.BUY, None, D("100")) == ("USDT", D("101"))
    assert unit("BTCUSDT", Side.BUY, None, None) is None  # no mid: nothing to price at
    assert unit("USDM:BTCUSDT", Side.BUY, D("100"), D("100")) is None
    assert unit("DOGEXYZ", Side.SELL, None, D("1")) is None
    assert (is_spot("BTCUSDT"), is_spot("USDM:BTCUSDT")) == (True, False)
    assert (assets_of("ETHFDUSD"), assets_of("USDM:ETHUSDT"), assets_of("XYZ")) == (("ETH", "FDUSD"), None, None)
    assert band_of(D(100), D(1000)) == D(100) and band_of(D(0), D(1000)) == D(1000)
    with pytest.raises(ValueError, match="fee asset"):
        FeeRates(asset="bnb")
    with pytest.raises(ValueError, match="fee rates"):
        FeeRates(taker=D("-0.001"))


def test_start_balances_default_to_the_start_cash_in_each_spot_quote_asset():
    syms = ("BTCUSDT", "ETHUSDT", "ETHBTC", "USDM:BTCUSDT")
    assert start_balances({}, syms, D("500")) == {"USDT": D("500"), "BTC": D("500")}
    assert start_balances({"USDT": D("1"), "BTC": D("0.25")}, syms, D("500")) == {"USDT": D("1"), "BTC": D("0.25")}
    canonical = load({"QF_START_BALANCES": "usdt=10000.50,btc=0.25"}).broker.start_balances
    assert parse_balances(canonical) == {"USDT": D("10000.5"), "BTC": D("0.25")} and parse_balances("") == {}


def test_fills_move_totals_and_holds_follow_the_remaining_quantity():
    bal = Balances({"USDT": D("100")})
    bal.hold("b", "USDT", D("100.1"), D("0.5"))
    assert (bal.reserved_of("USDT"), bal.free("USDT")) == (D("50.05"), D("49.95"))
    assert bal.on_fill("BTCUSDT", Side.BUY, D("0.2"), D("99.5"), D("0.0199"), "USDT")
    bal.set_remaining("b", D("0.3"))
    assert (bal.total("USDT"), bal.total("BTC"), bal.reserved_of("USDT")) == (D("80.0801"), D("0.2"), D("30.03"))
    assert bal.on_fill("BTCUSDT", Side.BUY, D("0.1"), D("100"), D("0.0001"), "BTC")  # fee out of the base
    assert (bal.total("USDT"), bal.total("BTC")) == (D("70.0801"), D("0.2999"))
    bal.hold("s", "BTC", D(1), D("0.2999"))
    assert bal.free("BTC") == 0
    assert bal.on_fill("BTCUSDT", Side.SELL, D("0.2999"), D("101"), D("0.0302899"))  # no fee asset: the quote
    bal.set_remaining("s", D(0))
    assert bal.total("BTC") == 0 and bal.total("USDT") == D("70.0801") + D("30.2899") - D("0.0302899")
    assert not bal.on_fill("USDM:BTCUSDT", Side.BUY, D("1"), D("100"))  # futures: no spot balance moves
    bal.release("b")
    bal.release("never held")
    assert bal.reserved == {} and bal.holds == {}
    assert bal.view() == {"BTC": {"total": "0", "reserved": "0", "free": "0"},
                          "USDT": {"total": "100.3397101", "reserved": "0", "free": "100.3397101"}}


# -- the gate --------------------------------------------------------------------------------

def test_a_buy_beyond_the_free_quote_is_denied_counting_open_buys():
    eng = engine({"USDT": "100"})
    assert type(send(eng, order("rest", Side.BUY, "0.5", "99"))) is Approval  # holds 0.5 × 99 × 1.001 = 49.5495
    assert eng.balances.free("USDT") == D("50.4505")
    denied = send(eng, order("b2", Side.BUY, "0.5", "101"))  # needs 50.5505
    assert denied.code == Reason.INSUFFICIENT_BALANCE
    assert denied.text.startswith(f"{TEXTS[Reason.INSUFFICIENT_BALANCE]}: needs 50.5505 USDT, 50.4505 USDT free")
    assert type(send(eng, order("b3", Side.BUY, "0.5", "100.5"))) is Approval  # needs 50.30025: fits
    assert eng.balances.free("USDT") == D("0.15025")
    assert send(eng, order("m", Side.BUY, "0.002")).code == Reason.INSUFFICIENT_BALANCE  # 0.002 × 101.101
    assert type(send(eng, order("m", Side.BUY, "0.001"))) is Approval  # 0.101101: fits
    eng.on_order("m", OrderStatus.CANCELLED, D(0))  # nothing to match: released
    eng.on_order("rest", OrderStatus.CANCELLED, D(0))  # released
    assert eng.balances.free("USDT") == D("100") - D("50.30025")
    assert type(send(eng, order("m", Side.BUY, "0.49"))) is Approval  # 0.49 × 101.101 = 49.53949


def test_a_sell_beyond_the_free_base_is_denied_counting_open_sells():
    eng = engine({"USDT": "0", "BTC": "0.01"})
    assert send(eng, order("s0", Side.SELL, "0.011")).code == Reason.INSUFFICIENT_BALANCE
    assert type(send(eng, order("s1", Side.SELL, "0.006", "100.5"))) is Approval  # rests, holds 0.006 BTC
    denied = send(eng, order("s2", Side.SELL, "0.005"))
    assert denied.code == Reason.INSUFFICIENT_BALANCE and "needs 0.005 BTC, 0.004 BTC free" in denied.text
    assert type(send(eng, order("s3", Side.SELL, "0.004"))) is Approval  # exactly what is free
    assert eng.balances.free("BTC") == 0
    # a flat account cannot go short: the old "SELL from flat" is no longer a spot order
    assert send(eng, order("e", Side.SELL, "0.001", symbol="ETHUSDT")).code == Reason.INSUFFICIENT_BALANCE


def test_reservations_are_consumed_by_fills_and_released_on_every_terminal_path():
    eng = engine({"USDT": "1000", "BTC": "1"})
    for coid in ("filled", "cancelled", "rejected", "expired", "refused", "partly"):
        assert type(send(eng, order(coid, Side.BUY, "1", "100"))) is Approval
    held = D("100.1")  # each: 1 × 100 × 1.001
    assert eng.balances.reserved_of("USDT") == 6 * held
    eng.settle_order("filled", OrderStatus.FILLED, D(1), [fill("f1", "filled", Side.BUY, "1", "99.5", "0.0995")], T0)
    eng.on_order("cancelled", OrderStatus.CANCELLED, D(0))
    eng.on_order("rejected", OrderStatus.REJECTED, D(0))
    eng.untrack("refused")  # the broker's own error: it never took the order
    eng.on_order("partly", OrderStatus.PARTIALLY_FILLED, D(0))  # known to the broker now: it does not expire
    eng.on_fill(fill("f2", "partly", Side.BUY, "0.4", "100", "0.02"), T0)  # a maker fill: 0.6 still held
    assert eng.balances.holds["partly"].amount == D("0.6") * held
    eng.expire(T0 + UNCERTAIN_NS)  # "expired" was never confirmed
    assert set(eng.balances.holds) == {"partly"} and eng.balances.reserved_of("USDT") == D("0.6") * held
    eng.on_order("partly", OrderStatus.CANCELLED, D("0.4"))
    assert eng.balances.reserved == {} and eng.balances.holds == {} and eng.working == {}
    assert eng.balances.total("USDT") == D("1000") - D("99.5") - D("0.0995") - D("40") - D("0.02")
    assert eng.balances.total("BTC") == D("2.4")


def test_a_retried_order_of_unknown_fate_holds_again_what_it_held_when_denied():
    eng = engine({"USDT": "100"})
    assert type(send(eng, order("u", Side.BUY, "0.9"))) is Approval  # at the mid 100: 0.9 × 101.101
    held = eng.balances.holds["u"]
    eng.on_book("BTCUSDT", 120.0, T0)  # the retry would reserve more now
    assert eng.recheck(order("u", Side.BUY, "0.9"), T0).code == Reason.INSUFFICIENT_BALANCE
    assert eng.balances.holds["u"] == held and eng.working["u"].expires_ns == T0 + UNCERTAIN_NS
    assert type(eng.recheck(order("u", Side.BUY, "0.8"), T0)) is Approval  # 0.8 × 121.3212 = 97.05696


def test_fees_in_the_received_asset_reserve_no_quote_fee_and_leave_the_base_short_of_the_buy():
    eng = engine({"USDT": "100.5"}, FeeRates(D("0.001"), D("0.001"), "received"))
    assert type(send(eng, order("b", Side.BUY, "1", "100.5"))) is Approval  # 100.5 USDT, the fee is in BTC
    eng.settle_order("b", OrderStatus.FILLED, D(1), [fill("f", "b", Side.BUY, "1", "100.5", "0.001", "BTC")], T0)
    assert (eng.balances.total("USDT"), eng.balances.total("BTC"), eng.ledger.qty("BTCUSDT")) == (0, D("0.999"),
                                                                                                   D("0.999"))
    assert send(eng, order("s", Side.SELL, "1")).code == Reason.INSUFFICIENT_BALANCE  # what was bought is not held
    assert type(send(eng, order("s", Side.SELL, "0.999"))) is Approval
    summary = eng.summary()
    assert summary["positions"]["BTCUSDT"]["fees_by_asset"] == {"BTC": "0.001"}
    assert summary["fees_by_asset"] == {"BTC": "0.001"} and summary["fees"] == "0"
    assert summary["balances"] == {"BTC": {"total": "0.999", "reserved": "0.999", "free": "0"},
                                   "USDT": {"total": "0", "reserved": "0", "free": "0"}}


def test_usdm_orders_are_unsupported_but_their_books_are_kept_and_marked():
    eng = engine({"USDT": "1000"}, lim=limits("BTCUSDT", "USDM:BTCUSDT"))
    eng.on_book("USDM:BTCUSDT", 101.5, T0)
    assert eng.book_ns["USDM:BTCUSDT"] == T0 and eng.marks["USDM:BTCUSDT"] == D("101.5")
    for req in (order("f", Side.BUY, "0.001", symbol="USDM:BTCUSDT"),
                order("g", Side.SELL, "0.001", "101.5", symbol="USDM:BTCUSDT")):
        denied = eng.check(req, T0)
        assert denied.code == Reason.UNSUPPORTED_MARKET
        assert denied.text.startswith("USD-M futures orders are not modelled (margin, leverage, funding): books only")
    assert type(eng.check(order("s", Side.BUY, "0.001"), T0)) is Approval  # spot still trades
    assert eng.balances.view() == {"USDT": {"total": "1000", "reserved": "0", "free": "1000"}}


def test_an_engine_from_config_takes_the_balances_and_the_brokers_fees():
    cfg = load({"QF_SYMBOLS": "btcusdt,usdm:ethusdt", "QF_START_BALANCES": "USDT=250,BTC=0.5",
                "QF_BROKER_TAKER_FEE": "0.002", "QF_BROKER_MAKER_FEE": "0.0004", "QF_BROKER_FEE_ASSET": "received"})
    eng = RiskEngine.from_config(from_config(cfg), cfg)
    assert eng.balances.totals == {"USDT": D(250), "BTC": D("0.5")}
    assert eng.fees == FeeRates(D("0.002"), D("0.0004"), "received")
    assert eng.ledger.start_cash == D(250)  # equity counts from the quote balance (QF_START_CASH follows it)
    plain = RiskEngine.from_config(from_config(load({"QF_START_CASH": "70"})), load({"QF_START_CASH": "70"}))
    assert plain.balances.totals == {"USDT": D(70)}  # as before the setting existed
    assert RiskEngine(limits(), D(5)).balances.totals == {"USDT": D(5)}  # the old constructor: the same rule


# -- a restart ----------------------------------------------------------------------------------

def test_a_rebuild_from_the_database_gives_the_same_balances_and_reservations(tmp_path):
    lived = engine({"USDT": "500", "BTC": "0.2"})
    fills, orders = [], []
    for coid, side, qty, price, filled in (("rb", Side.BUY, "1", "99", "0.25"), ("rs", Side.SELL, "0.1", "101", "0"),
                                           ("mb", Side.BUY, "0.5", None, "0.5")):
        assert type(send(lived, order(coid, side, qty, price))) is Approval
        done = [fill(f"{coid}-f", coid, side, filled, price or "100.5", "0.01")] if filled != "0" else []
        status = OrderStatus.FILLED if filled == qty else (
            OrderStatus.PARTIALLY_FILLED if done else OrderStatus.PENDING)
        lived.settle_order(coid, status, D(filled), done, T0)
        fills += done
        orders.append((coid, side, qty, price, filled, status))
    db = init_db(str(tmp_path / "qf.db"))
    try:
        for coid, side, qty, price, filled, status in orders:
            OrderRow.create(order_id=f"o-{coid}", client_order_id=coid, strategy="s", symbol="BTCUSDT",
                            side=side.value, kind="LIMIT" if price else "MARKET", tif="GTC", qty=D(qty),
                            price=D(price) if price else None, status=status.value, filled_qty=D(filled),
                            created_ts=T0, updated_ts=T0)
        for f in fills:
            FillRow.create(fill_id=f["fill_id"], order_id=f"o-{f['client_order_id']}",
                           client_order_id=f["client_order_id"], symbol=f["symbol"], side=f["side"],
                           price=D(f["price"]), qty=D(f["qty"]), fee=D(f["fee"]), fee_asset=f["fee_asset"],
                           liquidity="TAKER", exch_ts=1, ts=T0)
        rebuilt = RiskEngine(limits(), D("1000"), start_balances={"USDT": D("500"), "BTC": D("0.2")}, fees=FEES)
        found = store.rebuild(rebuilt, store.Forwarded(), T0)
    finally:
        db.close()
        close_db()
    assert found["fills"] == 2 and found["working"] == 2
    assert rebuilt.balances.view() == lived.balances.view()
    assert rebuilt.balances.holds == lived.balances.holds == {
        "rb": rebuilt.balances.holds["rb"], "rs": rebuilt.balances.holds["rs"]}
    assert rebuilt.balances.holds["rb"].amount == D("0.75") * D("99.099")


# -- risk, the ledger and the broker's account agree on every fill --------------------------------

@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40), st.integers(180, 220), st.booleans()),
                min_size=1, max_size=25))
def test_risk_ledger_and_broker_account_agree_to_the_last_digit(steps):
    """Long-only BUY/SELL fills, fees at 0.1 % paid in the asset received or the quote: risk's
    balances, its ledger position and the broker's Account hold the same base and quote."""
    eng = RiskEngine(limits(), D("10000"), start_balances={"USDT": D("10000")}, fees=FEES)
    acct = Account(D("10000"))
    held = D(0)
    for i, (buy, lots, half_ticks, received) in enumerate(steps):
        qty, price = lots * LOT, half_ticks * TICK
        if not buy:
            qty = min(qty, (held // LOT) * LOT)
            if not qty:
                continue
        side = Side.BUY if buy else Side.SELL
        in_base = buy and received
        fee = qty * D("0.001") if in_base else price * qty * D("0.001")
        asset = "BTC" if in_base else "USDT"
        assert eng.on_fill(fill(f"f{i}", "", side, str(qty), str(price), str(fee), asset), T0)
        acct.apply("BTCUSDT", side, price, qty, fee, asset)
        held = acct.positions["BTCUSDT"]
        assert eng.balances.total("BTC") == held == eng.ledger.qty("BTCUSDT") >= 0
        assert eng.balances.total("USDT") == acct.cash == eng.ledger.cash()


# -- a property: the account never goes negative -------------------------------------------------

class AccountMachine(RuleBasedStateMachine):
    """The risk engine against a small paper exchange whose fills stay within what risk reserves
    for (a LIMIT BUY never above its price, a MARKET BUY within the band of the mid it was
    checked at, fees at the configured rates), with acks that may be lost (the bus still tells,
    within the 10 s an order of unknown fate counts) and requests that may be lost (the exchange
    never sees them; they expire). Checked after every step: nothing is ever less than free, the
    holds are exactly `unit × remaining` of the working orders, the totals are the start plus the
    fills (a brute force in fractions), the broker's Account agrees; a restart rebuilds the same."""

    @initialize(usdt=st.integers(0, 80_000), btc=st.integers(0, 30), received=st.booleans())
    def start(self, usdt, btc, received):
        self.start_ = {"USDT": usdt * D("0.0001"), "BTC": btc * LOT}
        self.fees = FeeRates(D("0.001"), D("0.0005"), "received" if received else "quote")
        self.engine = self._new_engine()
        self.now, self.n = T0, 0
        self.mids = {s: D(100) for s in SYMBOLS}
        self.orders: dict[str, dict] = {}  # the exchange's open orders
        self.db: list[dict] = []  # every fill, in order
        self.bus: list[tuple] = []  # fills and order events not yet delivered
        self.acct = Account(self.start_["USDT"])
        self.applied: set[str] = set()
        for s in SYMBOLS:
            self.engine.on_book(s, 100.0, self.now)

    def _new_engine(self) -> RiskEngine:
        return RiskEngine(limits(), D("1000"), start_balances=self.start_, fees=self.fees)

    def _fill(self, o: dict, qty: D, price: D, maker: bool) -> None:
        self.n += 1
        rate = self.fees.maker if maker else self.fees.taker
        base, quote = assets_of(o["symbol"])
        in_base = o["side"] is Side.BUY and self.fees.asset == "received"
        fee, asset = (qty * rate, base) if in_base else (price * qty * rate, quote)
        f = fill(f"f{self.n}", o["coid"], o["side"], str(qty), str(price), str(fee), asset, o["symbol"])
        o["filled"] += qty
        self.db.append(f)
        self.bus.append(("fill", f))

    def _event(self, o: dict, status: OrderStatus) -> None:
        self.bus.append(("order", o["coid"], status, o["filled"]))

    def _apply(self, f: dict) -> None:
        if self.engine.on_fill(f, self.now):
            self.applied.add(f["fill_id"])

    def _deliver(self) -> None:
        for item in self.bus:
            if item[0] == "fill":
                self._apply(item[1])
            else:
                self.engine.on_order(*item[1:])
        self.bus.clear()

    @rule(symbol=st.sampled_from(SYMBOLS), side=st.sampled_from(Side), lots=st.integers(1, 30),
          limit=st.booleans(), offset=st.integers(-2, 2), take=st.integers(0, 30), slip=st.integers(-6, 6),
          fate=st.sampled_from(["acked", "ack lost", "request lost"]))
    def submit(self, symbol, side, lots, limit, offset, take, slip, fate):
        mid = self.mids[symbol]
        self._submit(symbol, side, lots * LOT, mid + offset * TICK if limit else None, take, slip, fate)

    @rule(symbol=st.sampled_from(SYMBOLS), side=st.sampled_from(Side), limit=st.booleans(),
          fate=st.sampled_from(["acked", "ack lost", "request lost"]))
    def spend_all(self, symbol, side, limit, fate):
        """The largest order risk lets through (tried from what the price alone would allow, down),
        filled at the worst price it reserved for (a LIMIT at its own price as a taker, a MARKET at
        the edge of the band): it must pass at what truly fits, and what truly fits is no less."""
        mid = self.mids[symbol]
        base, quote = assets_of(symbol)
        if side is Side.SELL:
            price, worst, unit, free = (mid - TICK if limit else None), D(1), D(1), self.engine.balances.free(base)
        else:
            price = mid + TICK if limit else None
            worst = price if limit else mid * D("1.01")
            rate = max(self.fees.taker, self.fees.maker) if limit else self.fees.taker
            unit = worst * (1 + rate) if self.fees.buy_fee_in_quote else worst
            free = self.engine.balances.free(quote)
        fits = int(free / unit / LOT)
        for lots in range(int(free / worst / LOT), fits, -1):  # too large by the fee or the band: denied
            assert self._submit(symbol, side, lots * LOT, price, 10**6, 10**6, fate) is False
        if fits > 0:
            assert self._submit(symbol, side, fits * LOT, price, 10**6, 10**6, fate, must_pass=True)

    def _submit(self, symbol, side, qty, price, take, slip, fate, must_pass=False):
        mid = self.mids[symbol]
        self.n += 1
        coid = f"c{self.n}"
        req = order(coid, side, str(qty), None if price is None else str(price), symbol)
        free_before = {a: self.engine.balances.free(a) for a in ("USDT", "BTC", "ETH")}
        verdict = send(self.engine, req, self.now)
        kind = "LIMIT" if price is not None else "MARKET"
        event(f"{side.value} {kind}{' (all)' if must_pass else ''}: {getattr(verdict, 'code', 'APPROVED')}")
        if type(verdict) is not Approval:
            assert not must_pass and verdict.code in (Reason.INSUFFICIENT_BALANCE, Reason.PRICE_BAND), verdict
            return False
        held = self.engine.balances.holds[coid]
        assert held.amount <= free_before[held.asset]  # an approval never spends more than is free
        if fate == "request lost":
            return True  # risk counts it until it expires; the exchange never heard of it
        o = {"coid": coid, "symbol": symbol, "side": side, "qty": qty, "filled": D(0), "price": price}
        touch = mid + TICK if side is Side.BUY else mid - TICK
        if price is None:  # a MARKET order walks to at most the band around the mid it was checked at
            band = mid / 100  # QF_RISK_PRICE_BAND_BPS 100
            fill_price = min(max(touch + slip * TICK, mid - band), mid + band)
            fill_price = (fill_price // TICK) * TICK if side is Side.BUY else -((-fill_price) // TICK) * TICK
            qty = min(o["qty"], take * LOT)
            if qty:
                self._fill(o, qty, fill_price, maker=False)
            self._event(o, OrderStatus.FILLED if o["filled"] == o["qty"] else OrderStatus.CANCELLED)
        else:
            crosses = price >= touch if side is Side.BUY else price <= touch
            if crosses:
                self._fill(o, o["qty"], touch, maker=False)
                self._event(o, OrderStatus.FILLED)
            else:
                self.orders[coid] = o
                self._event(o, OrderStatus.PENDING)
        if fate == "acked":
            self._deliver()
        return True

    @rule(symbol=st.sampled_from(SYMBOLS), ticks=st.integers(-4, 4), part=st.integers(1, 30))
    def book(self, symbol, ticks, part):
        """The book moves; resting orders it crosses fill at their own price (makers), some in part."""
        self.mids[symbol] = min(D(150), max(D(50), self.mids[symbol] + ticks * TICK))
        mid = self.mids[symbol]
        self.engine.on_book(symbol, float(mid), self.now)
        for coid, o in list(self.orders.items()):
            if o["symbol"] == symbol and (o["price"] >= mid + TICK if o["side"] is Side.BUY
                                          else o["price"] <= mid - TICK):
                self._fill(o, min(o["qty"] - o["filled"], part * LOT), o["price"], maker=True)
                done = o["filled"] == o["qty"]
                self._event(o, OrderStatus.FILLED if done else OrderStatus.PARTIALLY_FILLED)
                if done:
                    del self.orders[coid]

    @precondition(lambda self: self.orders)
    @rule(data=st.data(), told=st.booleans())
    def cancel(self, data, told):
        coid = data.draw(st.sampled_from(sorted(self.orders)))
        o = self.orders.pop(coid)
        self._event(o, OrderStatus.CANCELLED)
        if told:
            self._deliver()

    @rule()
    def deliver(self):
        self._deliver()

    @rule(seconds=st.integers(1, 30))
    def advance(self, seconds):
        """Time passes: the broker's events came meanwhile (they do within 10 s); unconfirmed orders expire."""
        self._deliver()
        self.now += seconds * S
        self.engine.expire(self.now)
        for s in SYMBOLS:
            self.engine.on_book(s, float(self.mids[s]), self.now)

    @rule()
    def restart(self):
        self._deliver()  # what the database holds, the old engine has read too
        old = self.engine
        new = self._new_engine()
        open_orders = [OpenOrder(c, o["symbol"], o["side"], o["qty"], o["qty"] - o["filled"], True, o["price"])
                       for c, o in self.orders.items()]
        assert new.replay(list(self.db), open_orders, None) == len(self.db)
        event(f"restart with {len(open_orders)} open orders" if open_orders else "restart")
        assert new.balances.totals == old.balances.totals
        assert new.balances.holds == {c: h for c, h in old.balances.holds.items() if c in self.orders}
        assert new.ledger.qty("BTCUSDT") == old.ledger.qty("BTCUSDT")
        self.engine, self.applied = new, {f["fill_id"] for f in self.db}
        for s in SYMBOLS:
            new.on_book(s, float(self.mids[s]), self.now)

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def nothing_is_ever_less_than_free(self):
        bal = self.engine.balances
        for asset in set(bal.totals) | set(bal.reserved):
            assert bal.free(asset) >= 0, (asset, bal.view())
            assert bal.total(asset) >= 0

    @invariant()
    def holds_are_the_working_orders_remaining_at_their_unit(self):
        eng, bal = self.engine, self.engine.balances
        assert set(bal.holds) == set(eng.working)
        sums: dict = {}
        for coid, held in bal.holds.items():
            assert held.amount == held.unit * eng.working[coid].remaining > 0
            sums[held.asset] = sums.get(held.asset, D(0)) + held.amount
        assert sums == bal.reserved
        if not eng.working:
            assert bal.reserved == {}

    @invariant()
    def totals_are_the_start_plus_the_fills(self):
        mine = [f for f in self.db if f["fill_id"] in self.applied]
        want = {a: Fraction(v) for a, v in self.start_.items()}
        for f in mine:
            base, quote = assets_of(f["symbol"])
            sign = 1 if f["side"] == "BUY" else -1
            want[base] = want.get(base, Fraction(0)) + sign * Fraction(f["qty"])
            want[quote] = want.get(quote, Fraction(0)) - sign * Fraction(f["qty"]) * Fraction(f["price"])
            want[f["fee_asset"]] = want[f["fee_asset"]] - Fraction(f["fee"])
        got = self.engine.balances.totals
        assert {a: Fraction(got.get(a, 0)) for a in want} == want and set(got) <= set(want)
        acct = Account(self.start_["USDT"])
        for f in mine:
            acct.apply(f["symbol"], Side(f["side"]), D(f["price"]), D(f["qty"]), D(f["fee"]), f["fee_asset"])
        assert acct.cash == got["USDT"]
        for symbol in SYMBOLS:
            assert acct.positions.get(symbol, D(0)) == self.engine.ledger.qty(symbol)
        assert self.engine.ledger.qty("BTCUSDT") == got["BTC"] - self.start_["BTC"]


TestAccountMachine = AccountMachine.TestCase
TestAccountMachine.settings = settings(max_examples=250, stateful_step_count=50, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
