"""tracing: instances.trace_context and trace_caller, tenants.telemetry_json, and the logs
table (commit aba9dba)

Instances created before it have no trace identity (NULL: no trace).

Revision ID: 0006_tracing
Revises: 0005_lease_wake_index
"""

from alembic import op
import sqlalchemy as sa

revision = "0006_tracing"
down_revision = "0005_lease_wake_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("trace_context", sa.String(length=55), nullable=True))
        batch.add_column(sa.Column("trace_caller", sa.String(length=55), nullable=True))
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("telemetry_json", sa.String(), nullable=True))
    op.create_table(
        "logs",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("instance_pk", sa.Integer(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("stream", sa.String(length=16), nullable=False),
        sa.Column("step", sa.String(length=256), nullable=True),
        sa.Column("count", sa.Integer(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("trace_id", sa.String(length=32), nullable=True),
        sa.Column("span_id", sa.String(length=16), nullable=True),
        sa.Column("message", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("pk"),
        if_not_exists=True,  # older code's create_all may have made it
    )
    op.create_index("ix_logs_instance", "logs", ["instance_pk", "pk"], if_not_exists=True)


def downgrade() -> None:
    raise NotImplementedError("journals are not downgraded: restore a backup")
