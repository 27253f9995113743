"""The runner's batch figures, read from the app's own counters between two scrapes."""

from __future__ import annotations

from bench.servers import batch_stats


def test_batches_and_each_replicas_share_of_the_images_in_the_window():
    before = {"images": 100.0, "calls": 10.0, "replica_images": {"a": 60.0, "b": 40.0}}
    after = {"images": 400.0, "calls": 60.0, "replica_images": {"a": 240.0, "b": 160.0}}
    assert batch_stats(before, after) == {
        "serve_batches": 50,
        "serve_mean_batch_images": 6.0,
        "serve_replica_image_shares": [0.6, 0.4],
    }


def test_a_replica_that_started_in_the_window_counts_from_zero():
    before = {"images": 10.0, "calls": 1.0, "replica_images": {"a": 10.0}}
    after = {"images": 110.0, "calls": 11.0, "replica_images": {"a": 35.0, "b": 75.0}}
    assert batch_stats(before, after)["serve_replica_image_shares"] == [0.75, 0.25]


def test_no_backend_call_in_the_window_gives_no_figures():
    counts = {"images": 5.0, "calls": 2.0, "replica_images": {}}
    assert batch_stats(counts, dict(counts)) is None
