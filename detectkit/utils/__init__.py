"""Helpers every layer may import: standard library only, no detectkit imports."""
