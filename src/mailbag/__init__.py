"""mailbag: a POP3 mail system (server, delivery, terminal client) on Maildir."""

__version__ = "0.1.0"
