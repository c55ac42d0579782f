"""retention: the tenant_retention table, and ix_instances_status_updated (counts, the
sweeper) in place of ix_instances_status (commit 26bc437)

Revision ID: 0010_retention
Revises: 0009_engine_sessions
"""

from alembic import op
import sqlalchemy as sa

revision = "0010_retention"
down_revision = "0009_engine_sessions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenant_retention",
        sa.Column("tenant_id", sa.String(length=100), nullable=False),
        sa.Column("retention_json", sa.String(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id"),
        if_not_exists=True,  # older code's create_all may have made it
    )
    op.create_index("ix_instances_status_updated", "instances", ["status", "updated_at"],
                    if_not_exists=True)
    op.drop_index("ix_instances_status", table_name="instances", if_exists=True)


def downgrade() -> None:
    raise NotImplementedError("journals are not downgraded: restore a backup")
