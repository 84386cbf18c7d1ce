"""Documented entry points that run from the repository (or image) root."""
