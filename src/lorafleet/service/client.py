"""A small Python client of the REST API and the ``lorafleet jobs`` command built on it.

    export LORAFLEET_URL=http://127.0.0.1:8000 LORAFLEET_TOKEN=lft_...
    lorafleet jobs create --training-file data.jsonl --rank 8 --n-epochs 3 --wait
    lorafleet jobs list
    lorafleet jobs show ftjob-...
    lorafleet jobs cancel ftjob-...
    lorafleet jobs download ftjob-... --output adapters/      # unzips the PEFT folder

Every API error becomes a ``ClientError`` (a ValueError) carrying the server's message, so the command line
prints it as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = ["Client", "ClientError", "add_jobs_command"]

_TERMINAL = ("succeeded", "failed", "cancelled")


class ClientError(ValueError):
    """An API error (``status`` is the HTTP status, 0 when the server could not be reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Client:
    """The REST API of ``lorafleet serve`` (``url`` like http://127.0.0.1:8000, ``token`` from
    ``lorafleet tokens create``)."""

    def __init__(self, url: str, token: str, timeout: float = 60.0) -> None:
        import httpx

        if not token:
            raise ClientError(
                0, "no API token: pass --token or set LORAFLEET_TOKEN (lorafleet tokens create)"
            )
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kw) -> Any:
        import httpx

        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ClientError(
                0, f"cannot reach {self.url} ({e}); is `lorafleet serve` running there?"
            ) from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:500] or r.reason_phrase
            raise ClientError(r.status_code, f"{r.status_code}: {message}")
        ctype = r.headers.get("content-type", "")
        return r.json() if ctype.startswith("application/json") else r.content

    # files
    def upload_file(self, path: str | Path) -> dict:
        p = Path(path)
        if not p.is_file():
            raise ClientError(0, f"{p}: no such file")
        with open(p, "rb") as fh:
            return self._call("POST", "/v1/files", files={"file": (p.name, fh, "application/jsonl")})

    def list_files(self, limit: int = 20, after: str | None = None) -> dict:
        return self._call("GET", "/v1/files", params=_params(limit=limit, after=after))

    # jobs
    def create_job(self, body: dict) -> dict:
        return self._call("POST", "/v1/fine_tuning/jobs", json=body)

    def list_jobs(self, limit: int = 20, after: str | None = None) -> dict:
        return self._call("GET", "/v1/fine_tuning/jobs", params=_params(limit=limit, after=after))

    def get_job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/fine_tuning/jobs/{_id(job_id)}")

    def cancel_job(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/fine_tuning/jobs/{_id(job_id)}/cancel")

    def pause_job(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/fine_tuning/jobs/{_id(job_id)}/pause")

    def resume_job(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/fine_tuning/jobs/{_id(job_id)}/resume")

    def events(self, job_id: str, after: str | None = None, limit: int = 100, order: str = "desc") -> dict:
        params = _params(after=after, limit=limit, order=order)
        return self._call("GET", f"/v1/fine_tuning/jobs/{_id(job_id)}/events", params=params)

    def checkpoints(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/fine_tuning/jobs/{_id(job_id)}/checkpoints")

    def wait(self, job_id: str, poll: float = 1.0, timeout: float | None = None, on_event=None) -> dict:
        """Poll until the job is finished; ``on_event(event)`` sees every new event in order."""
        after = None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            page = self.events(job_id, after=after, limit=1000, order="asc")
            for ev in page["data"]:
                after = ev["id"]
                if on_event is not None:
                    on_event(ev)
            job = self.get_job(job_id)
            if job["status"] in _TERMINAL and not page["has_more"]:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(0, f"job {job_id} is still {job['status']} after {timeout} s")
            if not page["has_more"]:
                time.sleep(poll)

    # adapters
    def download_adapter(self, adapter_id: str, output_dir: str | Path) -> Path:
        """Download the adapter's zip and unpack it into ``output_dir/<adapter id>/``; returns that folder."""
        data = self._call("GET", f"/v1/adapters/{_id(adapter_id)}/download")
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for name in zf.namelist():
                parts = PurePosixPath(name).parts
                # refuse absolute paths and '..' so a hostile archive cannot write outside output_dir
                if name.startswith("/") or ".." in parts or not parts or parts[0] != adapter_id:
                    raise ClientError(0, f"refusing archive member {name!r}: not inside {adapter_id}/")
            zf.extractall(out)
        return out / adapter_id


def _params(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def _id(value: str) -> str:
    # ids travel in URL paths; anything but the id alphabet is a user mistake, caught before a request
    if not value or not all(c.isalnum() or c in "-_" for c in value):
        raise ClientError(0, f"{value!r} is not an id (ids look like ftjob-..., adapter-..., file-...)")
    return value


# -- the command line -------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.token or "")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _file_id(client: Client, value: str | None) -> str | None:
    if value is None or value.startswith("file-"):
        return value
    f = client.upload_file(value)
    print(f"uploaded {value} as {f['id']} ({f['num_rows']} rows, {f['format']})", file=sys.stderr)
    return f["id"]


def _print_event(ev: dict) -> None:
    print(f"  {ev['message']}", file=sys.stderr)


_ADAPTER_FLAGS = ("type", "rank", "alpha", "dropout", "target_modules")


def _cmd_create(args: argparse.Namespace) -> int:
    client = _client(args)
    kind = {"sft": "supervised", "orpo": "dpo"}.get(args.method, args.method)
    hp: dict[str, Any] = {
        "batch_size": args.batch_size, "n_epochs": args.n_epochs,
        "learning_rate_multiplier": args.learning_rate_multiplier,
    }  # fmt: skip
    if kind in ("dpo", "kto"):
        hp["beta"] = args.beta
    if args.method in ("dpo", "kto") and args.reference:
        hp["reference"] = args.reference
    if kind == "kto":
        hp.update(desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight)
    training: dict[str, Any] = {"max_seq_len": args.max_seq_len}
    for key in ("eval_every_steps", "max_steps", "micro_batch_size"):
        if getattr(args, key) is not None:
            training[key] = getattr(args, key)
    # only the adapter flags given: the server's defaults otherwise, or what a continued model has
    adapter = {k: getattr(args, k) for k in _ADAPTER_FLAGS if getattr(args, k) is not None}
    if "target_modules" in adapter:
        adapter["target_modules"] = adapter["target_modules"].split(",")
    ext: dict[str, Any] = {"adapter": adapter, "training": training, "priority": args.priority}
    if kind == "dpo":
        ext["preference"] = {"objective": args.method}
    body: dict[str, Any] = {
        "training_file": _file_id(client, args.training_file),
        "method": {"type": kind, kind: {"hyperparameters": hp}},
        "lorafleet": ext,
    }
    if args.model:
        body["model"] = args.model
    if args.validation_file:
        body["validation_file"] = _file_id(client, args.validation_file)
    if args.suffix:
        body["suffix"] = args.suffix
    job = client.create_job(body)
    if args.wait:
        job = client.wait(job["id"], on_event=_print_event)
    if args.json:
        _print_json(job)
    else:
        print(job["id"] if not args.wait else f"{job['id']} {job['status']} {job['fine_tuned_model'] or ''}")
    return 1 if args.wait and job["status"] != "succeeded" else 0


def _cmd_list(args: argparse.Namespace) -> int:
    page = _client(args).list_jobs(limit=args.limit, after=args.after)
    if args.json:
        _print_json(page)
        return 0
    print(f"{'id':32} {'status':16} {'steps':>11} {'created':19}  adapter")
    for j in page["data"]:
        lf = j["lorafleet"]
        steps = f"{lf['step']}/{lf['total_steps'] if lf['total_steps'] is not None else '?'}"
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["created_at"]))
        print(f"{j['id']:32} {j['status']:16} {steps:>11} {created:19}  {j['fine_tuned_model'] or '-'}")
    if page["has_more"]:
        print(f"(more: --after {page['data'][-1]['id']})")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    client = _client(args)
    job = client.get_job(args.id)
    if args.json:
        _print_json(job)
        return 0
    shown = {**job, **{k: job["lorafleet"][k] for k in ("step", "total_steps")}}
    for key in ("id", "status", "model", "training_file", "validation_file", "fine_tuned_model", "step",
                "total_steps", "trained_tokens"):  # fmt: skip
        print(f"{key:18} {shown[key] if shown[key] is not None else '-'}")
    if job["error"]:
        print(f"{'error':18} {job['error']['message']}")
    events = client.events(args.id, limit=args.events)["data"]
    if events:
        print("recent events:")
        for ev in reversed(events):
            print(f"  {time.strftime('%H:%M:%S', time.localtime(ev['created_at']))}  {ev['message']}")
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    job = _client(args).cancel_job(args.id)
    _print_json(job) if args.json else print(f"{job['id']} {job['status']}")
    return 0


def _cmd_pause(args: argparse.Namespace) -> int:
    job = _client(args).pause_job(args.id)
    _print_json(job) if args.json else print(f"{job['id']} {job['status']}")
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    job = _client(args).resume_job(args.id)
    _print_json(job) if args.json else print(f"{job['id']} {job['status']}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    client = _client(args)
    adapter_id = args.id
    if args.id.startswith("ftjob-"):
        job = client.get_job(args.id)
        if job["status"] != "succeeded":
            raise ClientError(0, f"job {args.id} is {job['status']}; only a succeeded job has an adapter")
        adapter_id = job["fine_tuned_model"]
    folder = client.download_adapter(adapter_id, args.output)
    print(folder)
    return 0


def add_jobs_command(sub) -> None:
    """Register ``lorafleet jobs create|list|show|cancel|pause|resume|download`` on an argparse subparsers object."""
    p = sub.add_parser("jobs", help="fine-tuning jobs on a `lorafleet serve` server (REST client)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("LORAFLEET_URL", "http://127.0.0.1:8000"),
                        help="server URL (env LORAFLEET_URL)")  # fmt: skip
    common.add_argument(
        "--token", default=os.environ.get("LORAFLEET_TOKEN"), help="API token (env LORAFLEET_TOKEN)"
    )
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    jobs = p.add_subparsers(dest="jobs_command", required=True)

    c = jobs.add_parser("create", parents=[common], help="create a job (uploads local files first)")
    c.add_argument("--training-file", required=True, help="a file id, or a local JSONL file to upload")
    c.add_argument("--validation-file", help="a file id, or a local JSONL file to upload")
    c.add_argument(
        "--model", help="the base model (default: the server's), or a fine-tuned model or checkpoint id to "
        "continue from (its adapter settings are kept)",
    )  # fmt: skip
    c.add_argument("--type", choices=["lora", "dora"], help="adapter type (default lora)")
    c.add_argument("--rank", type=int, help="adapter rank (default 8)")
    c.add_argument("--alpha", type=float, help="adapter alpha (default 16)")
    c.add_argument("--dropout", type=float, help="adapter dropout (default 0)")
    c.add_argument("--target-modules", help="comma-separated (default q_proj,v_proj)")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument(
        "--learning-rate-multiplier", type=float, default=1.0, help="times the base learning rate 1e-4"
    )
    c.add_argument("--n-epochs", type=int, default=3)
    c.add_argument("--max-steps", type=int)
    c.add_argument("--max-seq-len", type=int, default=512)
    c.add_argument(
        "--eval-every-steps", type=int, help="validation loss every N steps (needs --validation-file)"
    )
    c.add_argument(
        "--method", choices=["sft", "dpo", "orpo", "kto"], default="sft",
        help="dpo/orpo: preference files; kto: unpaired rows",
    )  # fmt: skip
    c.add_argument("--beta", type=float, default=0.1, help="dpo/orpo/kto beta")
    c.add_argument(
        "--reference", help="dpo/kto reference: auto (default: the model continued from, else the base), base, "
        "init, or a model id",
    )  # fmt: skip
    c.add_argument("--desirable-weight", type=float, default=1.0, help="kto")
    c.add_argument("--undesirable-weight", type=float, default=1.0, help="kto")
    c.add_argument("--micro-batch-size", type=int, help="examples per fused forward/backward")
    c.add_argument("--suffix")
    c.add_argument("--priority", type=int, default=0)
    c.add_argument("--wait", action="store_true", help="follow the job until it finishes")
    c.set_defaults(func=_cmd_create)

    ls = jobs.add_parser("list", parents=[common], help="your jobs, newest first")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--after", help="job id: list the page after it")
    ls.set_defaults(func=_cmd_list)

    s = jobs.add_parser("show", parents=[common], help="one job and its recent events")
    s.add_argument("id")
    s.add_argument("--events", type=int, default=10, help="how many recent events")
    s.set_defaults(func=_cmd_show)

    x = jobs.add_parser("cancel", parents=[common], help="cancel a job that has not finished")
    x.add_argument("id")
    x.set_defaults(func=_cmd_cancel)

    ps = jobs.add_parser("pause", parents=[common], help="pause a job at its next checkpoint")
    ps.add_argument("id")
    ps.set_defaults(func=_cmd_pause)

    rs = jobs.add_parser("resume", parents=[common], help="resume a paused job from its checkpoint")
    rs.add_argument("id")
    rs.set_defaults(func=_cmd_resume)

    d = jobs.add_parser("download", parents=[common], help="download a job's adapter (PEFT folder)")
    d.add_argument("id", help="a job id or an adapter id")
    d.add_argument("--output", "-o", default=".", help="folder to unpack into (default: .)")
    d.set_defaults(func=_cmd_download)
