"""`berth loadtest`'s pure parts: the latency histogram and its split by status, the request bytes, the
recommendation."""

from __future__ import annotations

import httptools
import numpy as np
import pytest

from berth.client.loadtest import (
    HttpTarget,
    LatencyHistogram,
    LoadSpec,
    LoadTestError,
    fold_by_status,
    latency_summary,
    recommend_concurrency,
)


def test_histogram_percentiles_match_exact_ones_within_half_a_percent() -> None:
    rng = np.random.default_rng(7)
    values = (rng.lognormal(mean=np.log(2e6), sigma=1.0, size=200_000)).astype(np.int64)  # ~2 ms median
    hist = LatencyHistogram()
    for chunk in np.array_split(values, 17):  # folded in pieces, as the engine does
        hist.add(chunk)
    assert hist.total == values.size
    assert hist.max_ns == values.max()
    assert hist.mean_ns == pytest.approx(values.mean(), rel=1e-9)
    for q in (50, 90, 99, 99.9):
        exact = np.percentile(values, q, method="inverted_cdf")
        assert hist.percentile(q) == pytest.approx(exact, rel=0.005), q
    assert hist.percentile(100) == values.max()


def test_histogram_small_and_edge_values() -> None:
    hist = LatencyHistogram()
    assert hist.percentile(50) == 0
    hist.add(np.array([0, 1, 2, 255, 256, 257], dtype=np.int64))
    assert hist.percentile(1) == 0
    assert hist.percentile(50) == 2  # below 256 ns every value has its own bucket
    assert hist.percentile(100) == 257
    big = LatencyHistogram()
    big.add(np.array([3_600 * 10**9], dtype=np.int64))  # an hour
    assert big.percentile(50) == 3_600 * 10**9


def test_latencies_split_by_status_code_as_folded_in_pieces() -> None:
    rng = np.random.default_rng(3)
    ok = rng.integers(20_000_000, 40_000_000, size=3_000)  # 20–40 ms answers
    refused = rng.integers(100_000, 900_000, size=5_000)  # sub-ms refusals
    latencies = np.concatenate([ok, refused, [7_000_000]])
    codes = np.concatenate([np.full(ok.size, 200), np.full(refused.size, 429), [503]])
    order = rng.permutation(latencies.size)
    latencies, codes = latencies[order], codes[order]
    hists: dict[int, LatencyHistogram] = {}
    for lat_chunk, code_chunk in zip(np.array_split(latencies, 7), np.array_split(codes, 7), strict=True):
        fold_by_status(hists, lat_chunk, code_chunk)
    fold_by_status(hists, np.array([1_000_000], dtype=np.int64), np.array([503]))  # a chunk of one code
    assert sorted(hists) == [200, 429, 503]
    assert (hists[200].total, hists[429].total, hists[503].total) == (ok.size, refused.size, 2)
    assert (hists[200].min_ns, hists[200].max_ns) == (ok.min(), ok.max())
    assert hists[429].max_ns == refused.max()
    for q in (50, 99):
        assert hists[200].percentile(q) == pytest.approx(np.percentile(ok, q, method="inverted_cdf"), rel=0.005)
        assert hists[429].percentile(q) == pytest.approx(np.percentile(refused, q, method="inverted_cdf"), rel=0.005)
    summary = latency_summary(hists[503])
    assert summary["p50"] == pytest.approx(1.0, rel=0.005)
    assert (summary["max"], summary["mean"]) == (7.0, 4.0)


def test_recommendation_is_littles_law_rounded_up() -> None:
    assert recommend_concurrency(1000.0, 0.0031) == 4  # 3.1 in flight → 4
    assert recommend_concurrency(200.0, 0.05) == 10
    assert recommend_concurrency(5.0, 0.001) == 1  # never below one
    assert recommend_concurrency(0.0, 0.0) == 1


class _Capture:
    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def test_request_bytes_are_a_valid_http11_request() -> None:
    target = HttpTarget("http://127.0.0.1:8080/serving-endpoints/iris/invocations?x=1", body=b'{"a": 1}',
                        headers=(("Authorization", "Bearer t"), ("Content-Type", "application/json")))
    capture = _Capture()
    parser = httptools.HttpRequestParser(capture)
    parser.feed_data(target.request_bytes())
    assert capture.complete
    assert parser.get_method() == b"POST"
    assert parser.should_keep_alive()
    assert capture.url == b"/serving-endpoints/iris/invocations?x=1"
    assert capture.headers[b"host"] == b"127.0.0.1:8080"
    assert capture.headers[b"authorization"] == b"Bearer t"
    assert capture.headers[b"content-length"] == b"8"
    assert capture.body == b'{"a": 1}'
    get = HttpTarget("https://example.test/", method="GET")
    assert (get.tls, get.port, get.host) == (True, 443, "example.test")
    assert b"Content-Length" not in get.request_bytes()


@pytest.mark.parametrize("url", ["ftp://x/", "127.0.0.1:8080/x", "http:///nohost"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(LoadTestError):
        HttpTarget(url)


def test_load_spec_validation() -> None:
    assert LoadSpec().mode == "closed"
    assert LoadSpec(rate=10).mode == "open"
    for bad in ({"concurrency": 0}, {"rate": 0}, {"duration_s": 0}, {"warmup_s": -1}, {"timeout_s": 0}):
        with pytest.raises(LoadTestError):
            LoadSpec(**bad)  # type: ignore[arg-type]
