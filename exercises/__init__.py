"""The README's exercises: their solutions (*.patch) and the command that checks one (check.py)."""
