"""`python -m dynwf_ray.migrations revision "adds X"`: write the next revision, from what
differs between the head revision's schema and the models (Alembic's autogenerate, against
a scratch SQLite journal upgraded to the head, or `--url`'s journal)."""

from __future__ import annotations

import argparse
import re
import tempfile
from typing import Sequence

from alembic import command

from . import HEAD, alembic_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynwf_ray.migrations")
    sub = parser.add_subparsers(dest="command", required=True)
    revision = sub.add_parser("revision", help="write the next revision into versions/")
    revision.add_argument("message", help="what it adds, e.g. 'instance priorities'")
    revision.add_argument("--url", help="a journal at the head to compare the models with")
    args = parser.parse_args(argv)

    from ..journal import Journal

    slug = re.sub(r"[^a-z0-9]+", "_", args.message.lower()).strip("_")
    rev_id = f"{int(HEAD.split('_')[0]) + 1:04d}_{slug}"[:32].rstrip("_")  # alembic_version holds 32
    with tempfile.TemporaryDirectory() as scratch:
        url = args.url or f"sqlite:///{scratch}/journal.db"
        Journal(url).close()  # at the head
        config = alembic_config()
        config.attributes["url"] = url
        config.set_main_option("file_template", "%%(rev)s")  # the id says what it adds
        script = command.revision(config, message=args.message, autogenerate=True, rev_id=rev_id)
    print(f"wrote {script.path}: review it, and add {rev_id!r} with its test to REVISIONS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
