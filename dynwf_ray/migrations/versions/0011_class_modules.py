"""class modules: a registered class's manifest names the modules its pickle refers to, which
its sandbox must be able to import (commit 6df102e; a data revision, no schema change)

Classes registered before (manifest "{}", or {"module": ...} for a while) are read with
pickletools (nothing in the pickle runs). It changes only manifests without "modules", so
it runs on every journal made before revisions existed, whatever its tables.

Revision ID: 0011_class_modules
Revises: 0010_retention
"""

import json

from alembic import op
import sqlalchemy as sa

revision = "0011_class_modules"
down_revision = "0010_retention"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from dynwf_ray.package import pickled_modules

    conn = op.get_bind()
    classes = conn.execute(sa.text(
        "SELECT version, manifest_json FROM code_blobs WHERE kind = 'pickled-class'"
    )).all()
    for version, manifest_json in classes:
        if "modules" in json.loads(manifest_json or "{}"):
            continue
        blob = conn.execute(sa.text("SELECT blob FROM code_blobs WHERE version = :v"),
                            {"v": version}).scalar()
        conn.execute(
            sa.text("UPDATE code_blobs SET manifest_json = :m WHERE version = :v"),
            {"m": json.dumps({"modules": pickled_modules(bytes(blob))}), "v": version},
        )


def downgrade() -> None:
    raise NotImplementedError("journals are not downgraded: restore a backup")
