"""crashes and code wake index: the activation_crashes table and ix_instances_code_wake, a
host's claims by tenant and code version (commit 859969f)

Revision ID: 0008_crashes_code_wake
Revises: 0007_tenant_policies
"""

from alembic import op
import sqlalchemy as sa

revision = "0008_crashes_code_wake"
down_revision = "0007_tenant_policies"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_instances_code_wake", "instances", ["tenant_id", "code_version", "wake_at"],
                    if_not_exists=True)
    op.create_table(
        "activation_crashes",
        sa.Column("instance_pk", sa.Integer(), nullable=False),  # SERIAL on PostgreSQL, as create_all made it
        sa.Column("crashes", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("instance_pk"),
        if_not_exists=True,  # older code's create_all may have made it
    )


def downgrade() -> None:
    raise NotImplementedError("journals are not downgraded: restore a backup")
