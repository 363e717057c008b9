"""Mail storage: an interface (``base``) and interchangeable backends."""
