"""Command-line interface: the composition root that wires config, backends and servers."""
