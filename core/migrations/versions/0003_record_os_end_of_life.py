"""Record whether a scanned image's OS is past its end of service life.

Revision ID: 0003
Revises: 0002

Scans stored before this revision keep NULL, meaning not recorded.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scans", schema=None) as batch_op:
        batch_op.add_column(sa.Column("os_eosl", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("scans", schema=None) as batch_op:
        batch_op.drop_column("os_eosl")
