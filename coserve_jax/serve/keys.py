"""``python -m coserve_jax.serve.keys``: create, list and revoke the API keys kept in the
server's database (only each key's SHA-256 is stored; a new key is printed once).

    python -m coserve_jax.serve.keys create --project team-a [--admin] [--name ci] --output-dir coserve-output
    python -m coserve_jax.serve.keys list --output-dir coserve-output
    python -m coserve_jax.serve.keys revoke key-0123456789abcdef --output-dir coserve-output

``--database-url`` instead of ``--output-dir`` for a server that was given one. A running server
sees new and revoked keys at once (a revoked key's next request is a 401).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coserve_jax.serve.keys", description=__doc__.split("\n\n")[0])
    where = argparse.ArgumentParser(add_help=False)
    g = where.add_mutually_exclusive_group()
    g.add_argument("--output-dir", default="coserve-output", help="the server's output directory (its SQLite database)")
    g.add_argument("--database-url", help="the server's --database-url")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", parents=[where], help="create a key and print it (once)")
    c.add_argument("--project", required=True)
    c.add_argument("--admin", action="store_true", help="may load adapters from any path; what it loads is shared")
    c.add_argument("--name", help="a note for whoever lists the keys")
    sub.add_parser("list", parents=[where], help="list the keys (never the keys themselves)")
    r = sub.add_parser("revoke", parents=[where], help="revoke a key by its id")
    r.add_argument("key_id")
    args = p.parse_args(argv)

    from coserve_jax.configfile import ConfigError
    from coserve_jax.serve import auth
    from coserve_jax.serve.db import Database, sqlite_url

    db = Database(args.database_url or sqlite_url(os.path.join(args.output_dir, "coserve.db")))
    try:
        if args.command == "create":
            try:
                key_id, key = auth.create_key(db, args.project, args.admin, args.name)
            except ConfigError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            print(f"{key_id} (project {args.project}{', admin' if args.admin else ''}): {key}")
        elif args.command == "list":
            print(auth.to_json(auth.list_keys(db)))
        else:
            if not auth.revoke_key(db, args.key_id):
                print(f"error: no active key {args.key_id!r}", file=sys.stderr)
                return 1
            print(f"{args.key_id} revoked")
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
