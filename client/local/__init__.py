"""Tools for running the app on one machine: free ports, each run's HAProxy state directory, and
what a run left behind (Ray's processes, HAProxy), found and stopped. The local journey
(``client/pipeline.py``), the benchmarks and the tests use them; the served app does not."""
