"""engine sessions: the engine_sessions table, one row per scheduler incarnation (commit d436eb3)

Leases taken before it are owned by ids that name no session; they are
reclaimed when they expire, as before.

Revision ID: 0009_engine_sessions
Revises: 0008_crashes_code_wake
"""

from alembic import op
import sqlalchemy as sa

revision = "0009_engine_sessions"
down_revision = "0008_crashes_code_wake"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "engine_sessions",
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("engine_name", sa.String(length=100), nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("machine", sa.String(length=255), nullable=False),
        sa.Column("processes_json", sa.String(), nullable=False),
        sa.Column("loader_id", sa.String(length=64), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("ended_reason", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("epoch"),
        if_not_exists=True,  # older code's create_all may have made it
    )


def downgrade() -> None:
    raise NotImplementedError("journals are not downgraded: restore a backup")
