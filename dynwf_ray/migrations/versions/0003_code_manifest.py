"""code manifest: code_versions.manifest_json, a pushed package's manifest (commit 46b4d06)

Code stored before it (registered classes) has the empty manifest, "{}".

Revision ID: 0003_code_manifest
Revises: 0002_step_kind
"""

from alembic import op
import sqlalchemy as sa

revision = "0003_code_manifest"
down_revision = "0002_step_kind"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("code_versions") as batch:
        batch.add_column(sa.Column("manifest_json", sa.String(), nullable=False, server_default="{}"))
    with op.batch_alter_table("code_versions") as batch:  # the models have no server default
        batch.alter_column("manifest_json", server_default=None, existing_type=sa.String(),
                           existing_nullable=False)


def downgrade() -> None:
    raise NotImplementedError("journals are not downgraded: restore a backup")
