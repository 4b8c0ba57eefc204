"""Persistence: the only code that speaks SQL."""

from runservice.store.sql import SqlRunStore, open_store

__all__ = ["SqlRunStore", "open_store"]
