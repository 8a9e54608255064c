"""Importers of third-party weight spaces (pickles: explicit opt-in only)."""
