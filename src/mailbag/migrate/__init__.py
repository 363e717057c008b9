"""Moving users and mail from other servers to mailbag (``mailbag migrate``)."""
