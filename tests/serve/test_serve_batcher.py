"""DynamicBatcher: batch sizes, queue delay, bounded queue, cancellation, failure isolation, draining."""

import threading
import time

import pytest

from wsclip.serve.batcher import DynamicBatcher, QueueFull, ShuttingDown


def test_batches_fill_up_to_the_max_and_keep_order():
    sizes = []
    gate = threading.Event()

    def run(items):
        gate.wait(5)
        sizes.append(len(items))
        return [x * 2 for x in items]

    b = DynamicBatcher(run, max_batch_size=4, max_queue_delay_ms=50, max_queue=100).start()
    futs = [b.submit(i) for i in range(10)]
    gate.set()
    assert [f.result(5) for f in futs] == [2 * i for i in range(10)]
    assert sum(sizes) == 10 and max(sizes) <= 4 and sizes[0] == 4
    b.stop()


def test_a_lone_item_waits_about_the_queue_delay():
    b = DynamicBatcher(lambda items: items, max_batch_size=8, max_queue_delay_ms=80, max_queue=10).start()
    t0 = time.monotonic()
    assert b.submit("x").result(5) == "x"
    waited = time.monotonic() - t0
    assert 0.07 <= waited < 2.0
    b.stop()


def test_bounded_queue_cancellation_and_drain():
    gate = threading.Event()
    ran = []

    def run(items):
        gate.wait(5)
        ran.extend(items)
        return items

    b = DynamicBatcher(run, max_batch_size=1, max_queue_delay_ms=0, max_queue=2).start()
    first = b.submit("first")
    t_end = time.monotonic() + 5
    while b.depth and time.monotonic() < t_end:  # the worker takes "first" and blocks in run()
        time.sleep(0.001)
    queued = [b.submit("a"), b.submit("b")]
    with pytest.raises(QueueFull):
        b.submit("c")
    assert b.depth == 2 and b.in_flight == 3
    queued[0].cancel()  # a request that timed out while waiting
    gate.set()
    assert first.result(5) == "first" and queued[1].result(5) == "b"
    b.stop(drain=True)
    assert ran == ["first", "b"]
    with pytest.raises(ShuttingDown):
        b.submit("late")


def test_one_failing_item_does_not_fail_its_batch():
    def run(items):
        if any(x < 0 for x in items):
            raise ValueError("negative")
        return [x + 1 for x in items]

    b = DynamicBatcher(run, max_batch_size=8, max_queue_delay_ms=30, max_queue=10).start()
    futs = [b.submit(x) for x in (1, -1, 2)]
    assert futs[0].result(5) == 2 and futs[2].result(5) == 3
    with pytest.raises(ValueError):
        futs[1].result(5)
    b.stop()


def test_stop_without_drain_cancels_waiting_items():
    gate = threading.Event()
    b = DynamicBatcher(lambda items: (gate.wait(5), items)[1], max_batch_size=1, max_queue_delay_ms=0,
                       max_queue=5).start()
    first = b.submit(1)
    while b.depth:
        time.sleep(0.001)
    waiting = b.submit(2)
    threading.Timer(0.05, gate.set).start()
    b.stop(drain=False, timeout=5)
    assert first.result(5) == 1 and waiting.cancelled()
