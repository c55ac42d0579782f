"""lease wake index: ix_instances_lease_wake for the scheduler's next-wake query (commit b6f9af1)

Revision ID: 0005_lease_wake_index
Revises: 0004_code_blobs
"""

from alembic import op

revision = "0005_lease_wake_index"
down_revision = "0004_code_blobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_instances_lease_wake", "instances", ["lease_expires_at", "wake_at"],
                    if_not_exists=True)


def downgrade() -> None:
    raise NotImplementedError("journals are not downgraded: restore a backup")
