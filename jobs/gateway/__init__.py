"""The endpoints gateway: one stable URL per inference endpoint, in front of its replicas.

A process of its own (webapp/Procfile `gateway`: uvicorn running jobs.gateway.app:app);
the web stays gunicorn. Modules:

``app``        the ASGI proxy: auth, route, forward, stream back, retry before the first byte
``directory``  who may call which endpoint, and where its replicas are (DB + Redis, cached briefly)
``balancer``   least-outstanding choice among an endpoint's ready replicas (pure)
``load``       the Redis keys the gateway publishes load to (read by the autoscaler and the page)

It reads what jobs.endpoints writes (Endpoint, Replica, the routes key) and never
imports jobs.endpoints: the control plane may import jobs.gateway.load to read load.
"""
