"""tenant policies: the tenant_policies table, what the platform grants a tenant's sandboxes
(commit 135f0d6)

Revision ID: 0007_tenant_policies
Revises: 0006_tracing
"""

from alembic import op
import sqlalchemy as sa

revision = "0007_tenant_policies"
down_revision = "0006_tracing"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenant_policies",
        sa.Column("tenant_id", sa.String(length=100), nullable=False),
        sa.Column("policy_json", sa.String(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id"),
        if_not_exists=True,  # older code's create_all may have made it
    )


def downgrade() -> None:
    raise NotImplementedError("journals are not downgraded: restore a backup")
