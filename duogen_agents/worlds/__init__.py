"""Synthetic worlds whose answers can be checked exactly (``shapes``)."""
