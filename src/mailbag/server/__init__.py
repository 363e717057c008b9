"""Network layer: listeners, TLS, connection limits, signals."""
