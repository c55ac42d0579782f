"""instances autoincrement: on SQLite, an instance's pk is never used twice

SQLite gives a new row the largest rowid plus one, so the pk of the newest instance,
once deleted, went to the next one created, of any tenant. An activation of the
deleted instance still running then matched the new instance's row: its pk and its
first lease token. AUTOINCREMENT makes SQLite never reuse a rowid. The table is
rebuilt (SQLite cannot add it in place); PostgreSQL's sequence never reused one.

Revision ID: 0013_instances_autoincrement
Revises: 0012_api_access
"""

from alembic import op

revision = "0013_instances_autoincrement"
down_revision = "0012_api_access"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("instances", recreate="always",
                              table_kwargs={"sqlite_autoincrement": True}):
        pass


def downgrade() -> None:
    raise NotImplementedError("journals are not downgraded: restore a backup")
