"""Benchmarks: our Ray Serve gRPC front door against a hand-written baseline."""
