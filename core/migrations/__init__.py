"""Alembic migrations of SecAPI's database schema."""
