"""Hand-written baseline: a ``grpc.aio`` PredictionService over one SavedModel, no Ray.

What a small team would write by hand: ``tf.saved_model.load``, the ``serving_default``
signature, and an in-process dynamic batcher (collect requests up to ``max_batch_images``
images or ``batch_wait_s`` after the first one, run them as one call in a thread, split the
outputs). ``--no-batching`` runs every request on its own. Only ``Predict`` is served.

    python -m bench.baseline_server --port 9100 --model-dir runs/full1/1
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

logger = logging.getLogger("bench.baseline")

SERVING_DEFAULT = "serving_default"


class _BadRequest(ValueError):
    """The request cannot be served (maps to INVALID_ARGUMENT)."""


def _to_ndarray(tensor: Any) -> np.ndarray:
    from tensorflow.core.framework import types_pb2

    if tensor.dtype != types_pb2.DT_UINT8:
        raise _BadRequest("input 'images' must be DT_UINT8")
    shape = tuple(d.size for d in tensor.tensor_shape.dim)
    if len(shape) != 3 or shape[1:] != (28, 28):
        raise _BadRequest(f"input 'images' must be [N, 28, 28], got {list(shape)}")
    count = int(np.prod(shape))
    if tensor.tensor_content:
        if len(tensor.tensor_content) != count:
            raise _BadRequest("tensor_content size does not match the shape")
        return np.frombuffer(tensor.tensor_content, dtype=np.uint8).reshape(shape)
    if len(tensor.int_val) != count:
        raise _BadRequest("int_val size does not match the shape")
    return np.asarray(tensor.int_val, dtype=np.uint8).reshape(shape)


def _from_ndarray(array: np.ndarray) -> Any:
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    dtypes = {np.dtype(np.float32): types_pb2.DT_FLOAT, np.dtype(np.int64): types_pb2.DT_INT64}
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]
    )
    return tensor_pb2.TensorProto(
        dtype=dtypes[array.dtype],
        tensor_shape=shape,
        tensor_content=np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes(),
    )


class Model:
    """The ``serving_default`` signature of one SavedModel version."""

    def __init__(self, model_dir: str) -> None:
        import tensorflow as tf

        self._tf = tf
        self._saved_model = tf.saved_model.load(model_dir)  # keeps the variables alive
        self._fn = self._saved_model.signatures[SERVING_DEFAULT]
        self(np.zeros((1, 28, 28), np.uint8))  # trace/warm once before serving

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch (blocking: call it from a thread)."""
        outputs = self._fn(images=self._tf.constant(images))
        return {name: value.numpy() for name, value in outputs.items()}


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future[dict[str, np.ndarray]] = field(repr=False)


class Batcher:
    """Collect requests up to ``max_batch_images`` images or ``batch_wait_s``; one model call each."""

    def __init__(self, model: Model, max_batch_images: int = 32, batch_wait_s: float = 0.002) -> None:
        self._model = model
        self.max_batch_images = max_batch_images
        self._batch_wait_s = batch_wait_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._carry: _Pending | None = None  # did not fit the last batch
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.batched_images = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(images, future))
        return await future

    async def _collect(self) -> list[_Pending]:
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, size = [first], len(first.images)
        deadline = time.monotonic() + self._batch_wait_s
        while size < self.max_batch_images:
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                else:  # the wait is over: take only what is already queued
                    item = self._queue.get_nowait()
            except (TimeoutError, asyncio.QueueEmpty):
                break
            if size + len(item.images) > self.max_batch_images:
                self._carry = item
                break
            batch.append(item)
            size += len(item.images)
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            images = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
            self.batches += 1
            self.batched_images += len(images)
            try:
                outputs = await asyncio.to_thread(self._model, images)
            except Exception as exc:  # every caller of the batch gets the error
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            bounds = np.cumsum([len(p.images) for p in batch])[:-1]
            parts = {name: np.split(value, bounds) for name, value in outputs.items()}
            for i, pending in enumerate(batch):
                if not pending.future.done():  # the caller may have gone (deadline)
                    pending.future.set_result({name: split[i] for name, split in parts.items()})


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService``: ``Predict``; the stock stubs answer UNIMPLEMENTED."""

    def __init__(self, model: Model, batcher: Batcher | None, model_name: str | None) -> None:
        self._model = model
        self._batcher = batcher
        self._model_name = model_name

    async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        if self._model_name and request.model_spec.name != self._model_name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model_spec.name!r} not found")
        if request.model_spec.signature_name not in ("", SERVING_DEFAULT):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "only serving_default is served")
        if "images" not in request.inputs:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input 'images' is required")
        try:
            images = _to_ndarray(request.inputs["images"])
        except _BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self._batcher is not None and len(images) <= self._batcher.max_batch_images:
            outputs = await self._batcher.predict(images)
        else:
            outputs = await asyncio.to_thread(self._model, images)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.signature_name = SERVING_DEFAULT
        for name, value in outputs.items():
            response.outputs[name].CopyFrom(_from_ndarray(value))
        return response


async def serve(
    port: int,
    model_dir: str,
    *,
    batching: bool = True,
    max_batch_images: int = 32,
    batch_wait_s: float = 0.002,
    model_name: str | None = None,
    host: str = "127.0.0.1",
) -> None:
    """Serve ``model_dir`` on ``host:port`` until SIGINT/SIGTERM."""
    model = await asyncio.to_thread(Model, model_dir)
    batcher = Batcher(model, max_batch_images, batch_wait_s) if batching else None
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(model, batcher, model_name), server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    if batcher:
        batcher.start()
    mode = (
        f"batching up to {max_batch_images} images / {batch_wait_s * 1000:g} ms"
        if batching
        else "no batching"
    )
    logger.info("baseline serving %s on %s:%d (%s)", model_dir, host, bound, mode)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)
    if batcher:
        await batcher.stop()
        if batcher.batches:
            logger.info(
                "%d batches, mean %.1f images per batch",
                batcher.batches,
                batcher.batched_images / batcher.batches,
            )


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--port``, ``--model-dir``, ``--no-batching``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model-dir", required=True, help="one SavedModel version, e.g. runs/full1/1")
    parser.add_argument("--model-name", default=None, help="reject other model_spec.name values")
    parser.add_argument("--no-batching", action="store_true", help="run every request on its own")
    parser.add_argument("--max-batch-images", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(
        serve(
            args.port,
            args.model_dir,
            batching=not args.no_batching,
            max_batch_images=args.max_batch_images,
            batch_wait_s=args.batch_wait_ms / 1000,
            model_name=args.model_name,
            host=args.host,
        )
    )


if __name__ == "__main__":
    main()
