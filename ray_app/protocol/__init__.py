"""TF Serving's wire protocol, shared by the server (``ray_app``) and clients (``client/``, ``bench/``).

TensorFlow-free and cheap to import (no TensorFlow, Ray or FastAPI):

- :mod:`ray_app.protocol.protos`: TF Serving's protobuf messages (generated from its own
  descriptors, see :mod:`ray_app.protocol.generate`);
- :mod:`ray_app.protocol.tensors`: ``TensorProto`` <-> numpy, with size checks before allocation
  and TF Serving's answer encoding (typed repeated fields);
- :mod:`ray_app.protocol.status`: status codes, the gRPC <-> HTTP table, the errors clients see;
- :mod:`ray_app.protocol.names`: signature, input and output names, and the app's headers.
"""
