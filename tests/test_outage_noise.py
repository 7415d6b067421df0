"""connector.kafka_common.OutageNoise: aiokafka's per-attempt reconnect lines, sampled."""

from __future__ import annotations

import logging

from connector.kafka_common import OutageNoise


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("aiokafka", logging.ERROR, "client.py", 1, msg, args, None)


def test_reconnect_lines_are_sampled_with_the_count_left_out() -> None:
    """A broker gone: aiokafka logs a reconnect and a metadata failure per retry (1,455
    lines in 10 s at a 20 ms backoff). One of each kind per 10 s gets through, saying how
    many were left out; any other line is untouched."""
    clock = Clock()
    noise = OutageNoise(every_s=10, clock=clock)
    connect = "Unable connect to node with id %s: %s"
    metadata = "Unable to update metadata from %s"
    passed = []
    for _ in range(500):  # 5 s at 100 attempts a second
        for msg, args in ((connect, (1, "refused")), (metadata, (1,))):
            rec = record(msg, *args)
            if noise.filter(rec):
                passed.append(rec.getMessage())
        clock.now += 0.01
    assert passed == [
        "Unable connect to node with id 1: refused",
        "Unable to update metadata from 1",
    ]
    clock.now += 5  # the next window
    rec = record(connect, 1, "refused")
    assert noise.filter(rec)
    assert rec.getMessage() == (
        "Unable connect to node with id 1: refused (499 more like it in the last 10s)"
    )
    other = record("Got error produce response on %s", "tp")
    assert all(noise.filter(record("Got error produce response on %s", "tp")) for _ in range(5))
    assert noise.filter(other) and other.getMessage() == "Got error produce response on tp"
