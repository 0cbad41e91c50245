"""The fleet compile cache: which compiled configurations exist, the answer before
the queue (lookup), one compile per configuration at a time (claims), the cache
page and API, pinning and least-recently-used eviction (index)."""
