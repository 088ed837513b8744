"""Baselines with the public code's structure, written here from METHODS.md (no code copied)."""
