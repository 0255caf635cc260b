"""Alembic's migrations of the feedback database (a package so that an installed attune has them)."""
