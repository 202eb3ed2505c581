"""Count the licenses of each scan.

Revision ID: 0002
Revises: 0001

License findings are rows of ``findings`` with kind ``license``, which needs
no schema change. The count joins the other summary counts on ``scans``;
scans stored before this revision count 0 licenses.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scans", schema=None) as batch_op:
        batch_op.add_column(sa.Column("licenses", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    # Downgrading keeps the license rows of findings; no older code reads them.
    with op.batch_alter_table("scans", schema=None) as batch_op:
        batch_op.drop_column("licenses")
