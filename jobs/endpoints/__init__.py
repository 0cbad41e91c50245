"""Inference endpoints: a team's model served by long-running replicas (Jobs of kind
serve) behind one stable URL. This package is the control plane: what an endpoint
should be (services, forms), making replicas follow it (reconcile, autoscaler,
replicas), the routing table the gateway reads (routing), and the pages (selectors,
views)."""
