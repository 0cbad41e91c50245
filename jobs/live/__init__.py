"""Live utilization: the Redis metric streams the host agents write (`store`,
`metrics`: publish, cursor reads, the per-minute roll-up), the hosts, host and fleet
pages, and the Plotly figures they draw (`charts`)."""
