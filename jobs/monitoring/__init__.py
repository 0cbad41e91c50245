"""Prometheus /metrics for the fleet: jobs, waits, cores allocated and used, per-core
utilization, notification deliveries. A Grafana dashboard that reads them is in
webapp/monitoring."""
