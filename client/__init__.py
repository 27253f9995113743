"""Clients of the serving app: a command-line client and the library it is built on.

``client.messages`` builds TF Serving requests and reads responses (gRPC and REST),
``client.transport`` sends them with a deadline and turns failures into :class:`client.errors.ClientError`,
``client.images`` reads image files, and ``client.grpc_client`` is the command line.
"""
