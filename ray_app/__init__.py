"""Ray Serve application that speaks TF Serving's gRPC and REST protocols for MNIST models."""
