"""api access: the api_tokens and webhook_secrets tables of the HTTP API (issue 9), and
ix_instances_tenant_pk (a tenant's newest instances, paged)

Revision ID: 0012_api_access
Revises: 0011_class_modules
"""

from alembic import op
import sqlalchemy as sa

revision = "0012_api_access"
down_revision = "0011_class_modules"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("token_id", sa.String(length=12), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=100), nullable=True),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("token_id"),
        if_not_exists=True,  # a create_all may have made it
    )
    op.create_index("ix_api_tokens_hash", "api_tokens", ["token_hash"], unique=True,
                    if_not_exists=True)
    op.create_table(
        "webhook_secrets",
        sa.Column("tenant_id", sa.String(length=100), nullable=False),
        sa.Column("secret", sa.String(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id"),
        if_not_exists=True,
    )
    op.create_index("ix_instances_tenant_pk", "instances", ["tenant_id", "pk"], if_not_exists=True)


def downgrade() -> None:
    raise NotImplementedError("journals are not downgraded: restore a backup")
