"""The service's subcommands of ``lorafleet``: ``serve``, ``worker``, ``tokens``, ``tenants`` and ``jobs``.

    lorafleet tokens create --tenant alice --data-dir ./service-data     # prints the token once
    lorafleet tokens list --data-dir ./service-data
    lorafleet tokens revoke tok-... --data-dir ./service-data
    lorafleet tenants set alice --weight 2 --max-running-jobs 4 --max-queued-jobs 20 --max-stored-mb 500
    lorafleet serve --base-model path/to/model --data-dir ./service-data
    lorafleet serve --api-only --store postgresql://lf@db/lorafleet --base-model M --data-dir /shared
    lorafleet worker --store postgresql://lf@db/lorafleet --base-model M --data-dir /shared

Every command that opens the store takes ``--store URL`` (``sqlite:///PATH`` or ``postgresql://...``; the
default is ``sqlite:///DATA_DIR/lorafleet.db``).
    lorafleet jobs create --training-file data.jsonl --wait              # see lorafleet.service.client

Importing this module is cheap (no FastAPI, no torch): each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .client import add_jobs_command

__all__ = [
    "add_jobs_command",
    "add_serve_command",
    "add_tenants_command",
    "add_tokens_command",
    "add_worker_command",
]

_STORE_HELP = (
    "the job store: sqlite:///PATH (one machine) or postgresql://user@host[:port]/db (a fleet); "
    "default sqlite:///DATA_DIR/lorafleet.db"
)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    serve(
        base_model=args.base_model, data_dir=args.data_dir, host=args.host, port=args.port,
        max_upload_mb=args.max_upload_mb, dtype=args.dtype, device=args.device,
        max_concurrent_tasks=args.max_concurrent_tasks, max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
        poll_interval=args.poll_interval, access_log=args.access_log, worker=not args.api_only,
        num_threads=args.num_threads, store_url=args.store, adapter_cache_mb=args.adapter_cache_mb,
        max_inference_rows=args.max_inference_rows, inference=not args.no_inference, nproc=args.nproc,
    )  # fmt: skip
    return 0


def add_serve_command(sub) -> None:
    from .worker_args import add_engine_arguments

    p = sub.add_parser("serve", help="run the fine-tuning service: REST API, dashboard and training worker")
    p.add_argument("--base-model", required=True, help="Hugging Face model folder or .gguf file (or pkg:...)")
    p.add_argument(
        "--data-dir", required=True,
        help="uploads, checkpoints and adapters (a folder every API process and worker shares, e.g. NFS)",
    )  # fmt: skip
    p.add_argument("--store", default=None, help=_STORE_HELP)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=100.0, help="largest accepted training file")
    add_engine_arguments(p)
    p.add_argument(
        "--nproc", type=int, default=1, metavar="P",
        help="the worker as P pipeline stages on this machine (torchrun; restarted as a group; no inference)",
    )  # fmt: skip
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.add_argument(
        "--api-only", action="store_true",
        help="the API alone, no worker and no torch: several can run on one store (`lorafleet worker` trains)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_serve)


def _cmd_worker(args: argparse.Namespace) -> int:
    from .worker_process import run_worker

    return run_worker(args)


def add_worker_command(sub) -> None:
    from .worker_args import add_worker_arguments

    p = sub.add_parser(
        "worker",
        help="run a training worker: it claims jobs for its base model from the store and trains them",
    )
    add_worker_arguments(p)
    p.set_defaults(func=_cmd_worker)


def _store(args: argparse.Namespace):
    from .store import default_store_url, open_store

    if args.store:
        return open_store(args.store)
    if not args.data_dir:
        raise ValueError("give --store URL (sqlite:///PATH or postgresql://...) or --data-dir DIR")
    root = Path(args.data_dir).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"--data-dir {args.data_dir!r} does not exist (it is created by the first `lorafleet serve`)"
        )
    return open_store(default_store_url(root))


def _cmd_tokens(args: argparse.Namespace) -> int:
    from .auth import create_token, validate_tenant

    if args.tokens_command == "create":
        validate_tenant(args.tenant)
        if args.data_dir and not args.store:
            Path(args.data_dir).expanduser().mkdir(parents=True, exist_ok=True)
        rec, secret = create_token(_store(args), args.tenant)
        print(f"created {rec.id} for tenant {rec.tenant}; the token is shown only once:", file=sys.stderr)
        print(secret)
    elif args.tokens_command == "list":
        for t in _store(args).list_tokens(args.tenant):
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t.created_at))
            state = "revoked" if t.revoked_at else "active"
            print(f"{t.id}  {t.tenant:24} {state:8} {created}")
    elif args.tokens_command == "revoke":
        if not _store(args).revoke_token(args.id):
            raise ValueError(f"no active token {args.id!r}: see `lorafleet tokens list --data-dir DIR`")
        print(f"revoked {args.id}")
    return 0


def add_tokens_command(sub) -> None:
    p = sub.add_parser("tokens", help="create, list and revoke API tokens of tenants")
    tokens = p.add_subparsers(dest="tokens_command", required=True)
    c = tokens.add_parser("create", help="create a token for a tenant (new tenants are created by it)")
    c.add_argument("--tenant", required=True)
    ls = tokens.add_parser("list", help="tokens (never their secrets)")
    ls.add_argument("--tenant")
    r = tokens.add_parser("revoke", help="revoke a token by its id")
    r.add_argument("id", help="tok-...")
    for q in (c, ls, r):
        q.add_argument("--data-dir", help="the service's data folder (its default store)")
        q.add_argument("--store", help=_STORE_HELP)
        q.set_defaults(func=_cmd_tokens)


_KEEP = argparse.SUPPRESS  # a flag not given sets no attribute: the tenant's setting stays as it is (and
# --help shows no default for it)


def _limit(value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a whole number (or 'none' for no limit)"
        ) from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 0 (or 'none' for no limit)")
    return n


def _cmd_tenants(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .auth import validate_tenant

    store = _store(args)
    if args.tenants_command == "set":
        validate_tenant(args.tenant)
        rec = store.get_tenant(args.tenant)
        changes = {}
        if args.weight is not None:
            if args.weight <= 0:
                raise ValueError(f"--weight must be > 0 (got {args.weight})")
            changes["weight"] = args.weight
        for name in ("max_running_jobs", "max_queued_jobs"):
            if hasattr(args, name):
                changes[name] = getattr(args, name)
        if hasattr(args, "max_stored_mb"):
            changes["max_stored_bytes"] = (
                None if args.max_stored_mb is None else int(args.max_stored_mb * 2**20)
            )
        store.set_tenant(replace(rec, **changes))
    for t in store.list_tenants() if args.tenants_command == "list" else [store.get_tenant(args.tenant)]:

        def show(v):
            return "-" if v is None else str(v)

        stored = "-" if t.max_stored_bytes is None else f"{t.max_stored_bytes / 2**20:g} MB"
        print(
            f"{t.tenant:24} weight {t.weight:g}  max running {show(t.max_running_jobs)}  "
            f"max queued {show(t.max_queued_jobs)}  max stored {stored}"
        )
    return 0


def add_tenants_command(sub) -> None:
    p = sub.add_parser("tenants", help="fair-share weights and quotas of tenants")
    tenants = p.add_subparsers(dest="tenants_command", required=True)
    s = tenants.add_parser("set", help="set a tenant's weight and quotas (flags not given stay as they are)")
    s.add_argument("tenant")
    s.add_argument("--weight", type=float, default=None, help="share of the fleet's tokens (default 1)")
    s.add_argument("--max-running-jobs", type=_limit, default=_KEEP, help="N or none (leased jobs)")
    s.add_argument("--max-queued-jobs", type=_limit, default=_KEEP, help="N or none (validating + queued)")
    s.add_argument(
        "--max-stored-mb", type=lambda v: None if v.lower() == "none" else float(v), default=_KEEP,
        help="uploaded files, in MB, or none",
    )  # fmt: skip
    ls = tenants.add_parser("list", help="every tenant's weight and quotas")
    for q in (s, ls):
        q.add_argument("--data-dir", help="the service's data folder (its default store)")
        q.add_argument("--store", help=_STORE_HELP)
        q.set_defaults(func=_cmd_tenants)
