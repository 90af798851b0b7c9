"""History pages are served again from memory only while the database is unchanged: a commit by
another connection (the broker's) or a different query string reads afresh, and only 200 answers
are kept (a replaced file: test_app.py's replacement tests read through the same cache)."""
from __future__ import annotations

from services.api.pagecache import Page, PageCache


def test_the_same_page_again_is_served_from_memory(client, add_fill):
    add_fill("BTCUSDT", "BUY", "0.001", "61000.5")
    first = client.get("/api/v1/trades?limit=10")
    again = client.get("/api/v1/trades?limit=10")
    assert first.status_code == again.status_code == 200
    assert (first.headers["X-QF-Cache"], again.headers["X-QF-Cache"]) == ("miss", "hit")
    assert again.data == first.data and again.content_type == first.content_type == "application/json"
    csv1 = client.get("/api/v1/trades?limit=10&format=csv")
    csv2 = client.get("/api/v1/trades?limit=10&format=csv")
    assert csv1.headers["X-QF-Cache"] == "miss" and csv2.headers["X-QF-Cache"] == "hit"
    assert csv2.data == csv1.data and csv2.content_type.startswith("text/csv")


def test_a_commit_by_another_connection_drops_every_page(client, add_fill, add_order):
    add_fill("BTCUSDT", "BUY", "0.001", "61000.5")
    client.get("/api/v1/trades")
    client.get("/api/v1/orders")
    add_fill("ETHUSDT", "SELL", "0.02", "3000.25")  # the test's own connection: as the broker's
    after = client.get("/api/v1/trades")
    assert after.headers["X-QF-Cache"] == "miss"
    assert [t["symbol"] for t in after.get_json()["trades"]] == ["ETHUSDT", "BTCUSDT"]
    assert client.get("/api/v1/orders").headers["X-QF-Cache"] == "miss"


def test_the_next_cursor_header_is_kept_with_the_page(client, add_fill):
    for n in range(3):
        add_fill("BTCUSDT", "BUY", "0.001", f"6100{n}")
    first = client.get("/api/v1/trades?limit=2&format=csv")
    again = client.get("/api/v1/trades?limit=2&format=csv")
    assert again.headers["X-QF-Cache"] == "hit"
    assert again.headers["X-Next-Cursor"] == first.headers["X-Next-Cursor"] != ""


def test_refused_queries_are_not_kept(client, add_fill):
    add_fill("BTCUSDT", "BUY", "0.001", "61000.5")
    for _ in range(2):
        bad = client.get("/api/v1/trades?cursor=nonsense")
        assert bad.status_code == 400 and "X-QF-Cache" not in bad.headers


def test_the_cache_keeps_at_most_its_bytes_and_only_the_current_version():
    cache = PageCache(max_bytes=1000)
    page = Page(b"x" * 300, "application/json", ())
    for n in range(5):
        assert cache.get(f"/p{n}", version=(1, 1)) is None
        cache.put(f"/p{n}", (1, 1), page)
    kept = [n for n in range(5) if cache.get(f"/p{n}", (1, 1)) is not None]
    assert kept == [3, 4]  # 2 × (300 + 200) bytes: the least recently used went first
    assert cache.get("/p4", (1, 2)) is None and cache.get("/p4", (1, 1)) is None  # a new version drops all
    cache.put("/big", (1, 1), Page(b"x" * 2000, "application/json", ()))  # larger than the cache: not kept
    assert cache.get("/big", (1, 1)) is None
    cache.put("/late", (1, 0), page)  # read at an older version than the current one: not kept
    assert cache.get("/late", (1, 1)) is None
    assert cache.get("/p0", None) is None  # no version (a database server): nothing served


def test_only_get_answers_are_kept(client, add_fill):
    add_fill("BTCUSDT", "BUY", "0.001", "61000.5")
    for method in ("options", "head"):
        first = getattr(client, method)("/api/v1/trades?limit=5")
        assert first.status_code == 200 and "X-QF-Cache" not in first.headers
    got = client.get("/api/v1/trades?limit=5")
    assert got.headers["X-QF-Cache"] == "miss" and got.content_type == "application/json"
    assert got.get_json()["count"] == 1
    head = client.head("/api/v1/trades?limit=5")  # HEAD is served from the GET's page
    assert head.headers["X-QF-Cache"] == "hit" and head.content_type == "application/json"
    assert client.options("/api/v1/trades?limit=5").data == b""
