"""Alembic migrations of the records tables (a package so that installs ship them)."""
