"""Database models, engine and repositories."""
