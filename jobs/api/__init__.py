"""The JSON API at /api/v1/: `root` builds the NinjaAPI (token and session auth, one
error shape), and each area has its router here (`jobs`, `teams`, `live`, `usage`).
Routers hold no rules: they parse, call the area's services or selectors, and map
errors to responses."""
