"""Bring a database schema to the current version with Alembic."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from secapi.core.db.engine import sync_url
from secapi.core.settings import Settings

SCRIPT_LOCATION = "secapi.core:migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    # Percent signs in passwords would otherwise be read as interpolation.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_to_head(settings: Settings) -> None:
    """Apply every migration the database does not have yet."""
    if not settings.database_url:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(sync_url(settings)), "head")
