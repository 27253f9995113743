"""The one table of gRPC methods (ray_app.grpc_methods) agrees with what is registered on Serve's
gRPC servers (ray_app.grpc_servicers) and with the deployment's methods, which Serve routes to by
name: a method in one place and not another would be unreachable or answer UNIMPLEMENTED."""

from __future__ import annotations

import inspect

from ray_app import grpc_methods, grpc_servicers
from ray_app.deployment import MnistServer

REGISTERED = {
    grpc_methods.TF_SERVING: {*grpc_servicers.PREDICTION_METHODS, *grpc_servicers.MODEL_METHODS},
    grpc_methods.OIP_GRPC: set(grpc_servicers.INFERENCE_METHODS),
}


def test_every_registered_method_has_one_entry_under_its_protocol() -> None:
    by_protocol: dict[str, set[str]] = {}
    for name, method in grpc_methods.METHODS.items():
        by_protocol.setdefault(method.protocol, set()).add(name)
    assert by_protocol == REGISTERED


def test_the_deployment_has_an_async_method_per_entry_and_no_other_grpc_name() -> None:
    server = MnistServer.func_or_class
    for name in grpc_methods.METHODS:
        assert inspect.iscoroutinefunction(getattr(server, name)), name
    ours = [klass for klass in server.__mro__ if klass.__module__ == "ray_app.deployment"]
    capitalised = {name for klass in ours for name, value in vars(klass).items() if name[:1].isupper()}
    assert capitalised == set(grpc_methods.METHODS)


PACKAGES = {grpc_methods.TF_SERVING: "tensorflow.serving", grpc_methods.OIP_GRPC: "inference"}


def test_every_entry_answers_an_empty_response_of_its_own_protocol() -> None:
    for name, method in grpc_methods.METHODS.items():
        full_name = method.empty().DESCRIPTOR.full_name
        package, _, message = full_name.rpartition(".")
        assert package == PACKAGES[method.protocol] and message.endswith("Response"), (name, full_name)
        assert method.empty().ByteSize() == 0
