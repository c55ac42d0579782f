"""code blobs: code stored once per content in code_blobs; code_versions says which tenant
has which version (commit 6e1a6cb)

Each version's kind, blob and manifest move to code_blobs (a version is the hash
of its content, so the rows of every tenant that has it hold the same; the
first one's created_at is kept).

Revision ID: 0004_code_blobs
Revises: 0003_code_manifest
"""

from alembic import op
import sqlalchemy as sa

revision = "0004_code_blobs"
down_revision = "0003_code_manifest"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "code_blobs",
        sa.Column("version", sa.String(length=80), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("manifest_json", sa.String(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("version"),
        if_not_exists=True,  # older code's create_all may have made it (empty)
    )
    op.execute(
        "INSERT INTO code_blobs (version, kind, blob, manifest_json, created_at)"
        " SELECT c.version, c.kind, c.blob, c.manifest_json, c.created_at FROM code_versions c"
        " WHERE NOT EXISTS (SELECT 1 FROM code_versions d WHERE d.version = c.version AND"
        "  (d.created_at < c.created_at OR (d.created_at = c.created_at AND d.tenant_id < c.tenant_id)))"
        " AND NOT EXISTS (SELECT 1 FROM code_blobs b WHERE b.version = c.version)"
    )
    with op.batch_alter_table("code_versions") as batch:
        batch.drop_column("kind")
        batch.drop_column("blob")
        batch.drop_column("manifest_json")


def downgrade() -> None:
    raise NotImplementedError("journals are not downgraded: restore a backup")
