"""Helper scripts for development and tests (importable with the repo root on sys.path)."""
