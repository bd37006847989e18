"""The admin endpoint: Prometheus metrics, a JSON status and a health check over HTTP,
on loopback TCP or a unix socket (`[gateway] admin`); read-only views of the gateway."""
