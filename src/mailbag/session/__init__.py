"""Async application logic: drives the sans-IO protocol with real auth and storage."""
