"""Built-in standard services a gateway serves as targets (RFC 862, 863, 864, 867, 868)."""

from gateway.security.policy import SERVICE_NAMES
from gateway.services.standard import (
    is_service_target,
    serve_datagrams,
    serve_stream,
    service_name,
)

__all__ = ["SERVICE_NAMES", "is_service_target", "serve_datagrams", "serve_stream", "service_name"]
