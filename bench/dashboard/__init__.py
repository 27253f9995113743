"""bench/dashboard_check.py's parts: the dashboard's queries, the cluster it watches, the traffic
and training it sends, Prometheus, and the report."""
