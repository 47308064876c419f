"""The service's subcommands of ``lorafleet``: ``serve``, ``tokens`` and ``jobs``.

    lorafleet tokens create --tenant alice --data-dir ./service-data     # prints the token once
    lorafleet tokens list --data-dir ./service-data
    lorafleet tokens revoke tok-... --data-dir ./service-data
    lorafleet serve --base-model path/to/model --data-dir ./service-data
    lorafleet jobs create --training-file data.jsonl --wait              # see lorafleet.service.client

Importing this module is cheap (no FastAPI, no torch): each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .client import add_jobs_command

__all__ = ["add_jobs_command", "add_serve_command", "add_tokens_command"]


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    serve(
        base_model=args.base_model, data_dir=args.data_dir, host=args.host, port=args.port,
        max_upload_mb=args.max_upload_mb, dtype=args.dtype, device=args.device,
        max_concurrent_tasks=args.max_concurrent_tasks, max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
        poll_interval=args.poll_interval, access_log=args.access_log, worker=not args.no_worker,
        num_threads=args.num_threads, adapter_cache_mb=args.adapter_cache_mb,
        max_inference_rows=args.max_inference_rows, inference=not args.no_inference,
    )  # fmt: skip
    return 0


def add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="run the fine-tuning service: REST API, dashboard and training worker")
    p.add_argument("--base-model", required=True, help="Hugging Face model folder or .gguf file (or pkg:...)")
    p.add_argument("--data-dir", required=True, help="database, uploads, checkpoints and adapters live here")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=100.0, help="largest accepted training file")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--max-concurrent-tasks", type=int, default=8, help="jobs that train at the same time")
    p.add_argument(
        "--max-tokens-per-micro-batch", type=int, default=4096, help="fused micro-batch token budget"
    )
    p.add_argument(
        "--poll-interval", type=float, default=0.5, help="seconds between the worker's store reads"
    )
    p.add_argument(
        "--num-threads", type=int, default=None,
        help="CPU threads the worker's torch uses (default: torch's; 1 on a small machine shared with the API)",
    )  # fmt: skip
    p.add_argument(
        "--adapter-cache-mb", type=float, default=1024.0,
        help="inference: adapters kept loaded on the worker, least recently used evicted first",
    )  # fmt: skip
    p.add_argument("--max-inference-rows", type=int, default=64, help="inference requests decoded together")
    p.add_argument("--no-inference", action="store_true", help="no chat/completions: the worker only trains")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.add_argument(
        "--no-worker", action="store_true", help="API only (a worker runs elsewhere on this data dir)"
    )
    p.set_defaults(func=_cmd_serve)


def _store(data_dir: str):
    from .files import DataDir
    from .store import SQLiteStore

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"--data-dir {data_dir!r} does not exist (it is created by the first `lorafleet serve`)"
        )
    return SQLiteStore(DataDir(root).db)


def _cmd_tokens(args: argparse.Namespace) -> int:
    from .auth import create_token, validate_tenant

    if args.tokens_command == "create":
        validate_tenant(args.tenant)
        Path(args.data_dir).expanduser().mkdir(parents=True, exist_ok=True)
        rec, secret = create_token(_store(args.data_dir), args.tenant)
        print(f"created {rec.id} for tenant {rec.tenant}; the token is shown only once:", file=sys.stderr)
        print(secret)
    elif args.tokens_command == "list":
        for t in _store(args.data_dir).list_tokens(args.tenant):
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t.created_at))
            state = "revoked" if t.revoked_at else "active"
            print(f"{t.id}  {t.tenant:24} {state:8} {created}")
    elif args.tokens_command == "revoke":
        if not _store(args.data_dir).revoke_token(args.id):
            raise ValueError(f"no active token {args.id!r}: see `lorafleet tokens list --data-dir DIR`")
        print(f"revoked {args.id}")
    return 0


def add_tokens_command(sub) -> None:
    p = sub.add_parser("tokens", help="create, list and revoke API tokens of tenants")
    tokens = p.add_subparsers(dest="tokens_command", required=True)
    c = tokens.add_parser("create", help="create a token for a tenant (new tenants are created by it)")
    c.add_argument("--tenant", required=True)
    c.add_argument("--data-dir", required=True)
    ls = tokens.add_parser("list", help="tokens (never their secrets)")
    ls.add_argument("--data-dir", required=True)
    ls.add_argument("--tenant")
    r = tokens.add_parser("revoke", help="revoke a token by its id")
    r.add_argument("id", help="tok-...")
    r.add_argument("--data-dir", required=True)
    for q in (c, ls, r):
        q.set_defaults(func=_cmd_tokens)
