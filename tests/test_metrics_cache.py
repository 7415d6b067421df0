"""Memoised labelled children (connector.metrics.CachedCounter / CachedHistogram): the
same series as prometheus_client's own ``labels()``, and ``remove``/``clear`` forget them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from connector.metrics import CachedCounter, CachedHistogram, Metrics


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_memoised_children_are_the_exported_series() -> None:
    registry = CollectorRegistry()
    counter = CachedCounter("c_total", "c", ["topic", "code"], registry=registry)
    counter.labels("in", 201).inc()
    counter.labels("in", 201).inc()
    counter.labels(topic="in", code="201").inc()  # keywords: same series
    counter.labels("in", "201").inc()  # str and int label values: same series
    assert counter.labels("in", 201) is counter.labels("in", "201")
    assert _value(registry, "c_total", topic="in", code="201") == 4


def test_remove_and_clear_forget_the_memo() -> None:
    registry = CollectorRegistry()
    counter = CachedCounter("r_total", "r", ["topic"], registry=registry)
    counter.labels("a").inc(5)
    counter.remove("a")
    assert _value(registry, "r_total", topic="a") is None
    counter.labels("a").inc()  # a new series, not the removed child
    assert _value(registry, "r_total", topic="a") == 1
    counter.clear()
    counter.labels("a").inc(2)
    assert _value(registry, "r_total", topic="a") == 2


def test_histogram_children_are_memoised_and_exported() -> None:
    registry = CollectorRegistry()
    histogram = CachedHistogram("h_seconds", "h", ["class"], buckets=(1, 2), registry=registry)
    histogram.labels("2xx").observe(0.5)
    histogram.labels("2xx").observe(1.5)
    assert histogram.labels("2xx") is histogram.labels("2xx")
    assert _value(registry, "h_seconds_count", **{"class": "2xx"}) == 2


def test_per_event_metrics_use_the_memo() -> None:
    metrics = Metrics()
    for metric in (
        metrics.events_consumed,
        metrics.threads_created,
        metrics.dedup_hits,
        metrics.api_responses,
        metrics.api_call_duration,
    ):
        assert isinstance(metric, CachedCounter | CachedHistogram)
    metrics.init_topics(["in"])
    metrics.events_consumed.labels("in").inc()
    assert b'threads_connector_events_consumed_total{topic="in"} 1.0' in generate_latest(
        metrics.registry
    )
