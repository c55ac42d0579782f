"""step kind: steps.kind, do | sleep | wait (commit 4585e1c)

Steps recorded before it get the kind they had: the first code recorded sleeps
and waits with 0 attempts (a step.do attempt is numbered from 1); a wait is
waiting, failed (timed out), or holds the event it received (a JSON object),
a sleep holds its wake time (a number).

Revision ID: 0002_step_kind
Revises: 0001_baseline
"""

from alembic import op
import sqlalchemy as sa

revision = "0002_step_kind"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("steps") as batch:
        batch.add_column(sa.Column("kind", sa.String(), nullable=False, server_default="do"))
    op.execute(
        "UPDATE steps SET kind = CASE"
        " WHEN attempts = 0 AND (status IN ('waiting', 'failed') OR result_json LIKE '{%')"
        " THEN 'wait' WHEN attempts = 0 THEN 'sleep' ELSE 'do' END"
    )
    with op.batch_alter_table("steps") as batch:  # the models have no server default
        batch.alter_column("kind", server_default=None, existing_type=sa.String(),
                           existing_nullable=False)


def downgrade() -> None:
    raise NotImplementedError("journals are not downgraded: restore a backup")
