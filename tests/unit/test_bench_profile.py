"""bench/profile_replica.py charges each py-spy sample to the innermost frame with a known owner."""

from __future__ import annotations

from bench.profile_replica import IDLE, NATIVE_LOOP, owner_of, shares

ROOT = "_run_once (/usr/lib/python3.11/asyncio/base_events.py:1922);_run (/usr/lib/python3.11/asyncio/events.py:84)"


def test_innermost_known_owner_takes_the_sample() -> None:
    # numpy under our code is ours; protobuf under Ray's servicer is protobuf
    ours = f"{ROOT};predict (/x/ray_app/grpc_api.py:80);decode (/x/ray_app/protocol/tensors.py:50);frombuffer (/x/numpy/core.py:1)"
    assert owner_of(ours) == "ours (ray_app)"
    assert (
        owner_of(
            f"{ROOT};handle (/x/ray/serve/_private/replica.py:1);FromString (/x/google/protobuf/message.py:3)"
        )
        == "protobuf"
    )
    model = f"{ROOT};_call (/x/ray_app/backends.py:9);__call__ (/x/tensorflow/python/eager/def_function.py:5)"
    assert owner_of(model) == "TensorFlow (model call)"
    assert owner_of(f"{ROOT};_process_batches (/x/ray/serve/batching.py:400)") == "Serve @serve.batch"
    assert (
        owner_of(f"{ROOT};handle_request (/x/ray/serve/_private/replica.py:700)") == "Ray Serve request path"
    )
    assert owner_of(f"{ROOT};record (/x/ray/util/metrics.py:10)") == "Ray core"
    assert owner_of(f"{ROOT};_handle_call (/x/grpc/aio/_server.py:3)") == "gRPC (grpc.aio)"
    assert owner_of(ROOT) == "asyncio / uvloop"
    assert owner_of("main (/x/somewhere.py:1)") == "other"


def test_thread_entry_as_innermost_frame_is_native_loop_or_idle_pool() -> None:
    entry = (
        "_bootstrap (/usr/lib/python3.11/threading.py:1002);Thread.run (/usr/lib/python3.11/threading.py:982)"
    )
    assert owner_of(entry) == NATIVE_LOOP
    assert owner_of(f"{entry};_worker (/usr/lib/python3.11/concurrent/futures/thread.py:81)") == IDLE
    counts, total = shares(
        f"{entry} 7\n{entry};_worker (/usr/lib/python3.11/concurrent/futures/thread.py:81) 5"
    )
    assert counts == {NATIVE_LOOP: 7, IDLE: 5} and total == 7  # idle samples are not busy time


def test_shares_sum_the_raw_counts() -> None:
    raw = "\n".join(
        [
            f"{ROOT};__call__ (/x/tensorflow/python/x.py:1) 30",
            f"{ROOT};predict (/x/ray_app/predictor.py:2) 10",
            f"{ROOT};predict (/x/ray_app/predictor.py:3) 5",
            "",
            "not a sample line",
        ]
    )
    counts, total = shares(raw)
    assert counts == {"TensorFlow (model call)": 30, "ours (ray_app)": 15}
    assert total == 45
