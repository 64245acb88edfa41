"""Helpers shared by every test tier (no torch, no targets imported here)."""
