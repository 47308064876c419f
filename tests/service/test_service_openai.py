"""The official ``openai`` SDK against a live server (uvicorn, a real port) and a worker (in this process,
in a thread), through the SDK's documented calls only: files, fine-tuning jobs in the method and legacy
forms, list with metadata filter, events, checkpoints, pause / resume / cancel, models, chat completions
(plain and streamed) and completions with the fine-tuned model. Oracles: ``lorafleet generate`` with the
downloaded adapter (greedy, token for token) and each request's single-request answer for the concurrent
batch."""

from __future__ import annotations

import io
import json
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from lorafleet.cli import main as cli_main
from lorafleet.lora import AdapterSpec, adapter_parameters, add_adapter, save_peft
from lorafleet.models import load_model
from lorafleet.service.files import new_adapter_id, new_job_id
from lorafleet.service.inprocess import InProcessService
from lorafleet.service.jobrequest import JobCreate
from lorafleet.service.store import JobRecord

pytestmark = pytest.mark.slow

ROWS = [{"prompt": f"what is {i} plus {i}?", "completion": f" {2 * i}"} for i in range(8)]
TRAINING = {"max_steps": 4, "save_every_steps": 2, "max_seq_len": 32}


class Live(InProcessService):
    """The service on a real port; ``client(tenant)`` is an official SDK client."""

    def __init__(self, root, model_dir) -> None:
        super().__init__(root, str(model_dir))
        self.model_dir = model_dir
        self.secrets = {t: self.token(t) for t in ("alice", "bob")}

    def client(self, tenant: str, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=self.secrets[tenant], **kw)


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model_dir):
    s = Live(tmp_path_factory.mktemp("openai") / "data", tiny_model_dir).start()
    yield s
    s.close()


def _wait(client, job_id, statuses, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def _cli_generate(capsys, model_dir, adapter_dir, prompt: str, n: int) -> str:
    capsys.readouterr()
    args = ["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", str(n)]
    assert cli_main([*args, "--adapter", f"ft={adapter_dir}"]) == 0
    out = capsys.readouterr().out.splitlines()
    return next(line for line in out if line.startswith("[ft]")).removeprefix("[ft]").strip()


def _gpt2_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable character for each byte (GPT-2's table, written out independently)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return {(chr(b) if b in keep else chr(next(extra))): b for b in range(256)}


def _generate_tokens(model_dir, adapter_dir, prompt: str, n: int) -> list[bytes]:
    """The oracle: what `lorafleet generate` runs (greedy ``generate`` with the PEFT folder loaded), its ids
    spelled as bytes through transformers' tokenizer."""
    import transformers

    from lorafleet.lora import load_peft
    from lorafleet.models.generate import generate
    from lorafleet.models.tokenizer import load_tokenizer

    model = load_model(model_dir)
    load_peft(model, adapter_dir, "ft")
    tok = load_tokenizer(model_dir)
    ids = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True),
        add_special_tokens=False,
    )
    out = generate(model.eval(), tok, [ids], n, adapters=["ft"])[0]
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    alphabet = _gpt2_alphabet()
    return [bytes(alphabet[c] for c in piece) for piece in hf.convert_ids_to_tokens(out)]


def test_fine_tune_and_serve_through_the_official_sdk(live, tmp_path, capsys):
    alice, bob = live.client("alice"), live.client("bob", max_retries=0)
    f = alice.files.create(
        file=("train.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS).encode()), purpose="fine-tune"
    )
    assert f.purpose == "fine-tune" and f.bytes > 0

    # the method form, with lorafleet's extension field through extra_body
    job = alice.fine_tuning.jobs.create(
        model=live.base, training_file=f.id, suffix="sdk", metadata={"team": "red"}, seed=42,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2, "n_epochs": "auto", "learning_rate_multiplier": 20}}},
        extra_body={"lorafleet": {"adapter": {"rank": 4}, "training": TRAINING}},
    )  # fmt: skip
    assert job.status == "validating_files" and job.organization_id == "alice" and job.seed == 42
    assert job.hyperparameters.batch_size == 2 and job.hyperparameters.n_epochs == 3
    assert job.method.type == "supervised" and job.metadata == {"team": "red"}
    # the legacy form: a long job to pause, resume and cancel
    long = alice.fine_tuning.jobs.create(
        model=live.base, training_file=f.id, hyperparameters={"batch_size": 2, "learning_rate_multiplier": 2},
        extra_body={"lorafleet": {"training": {**TRAINING, "max_steps": 100000}}},
    )  # fmt: skip
    assert long.hyperparameters.learning_rate_multiplier == 2 and long.method.type == "supervised"
    assert 0 <= long.seed < 2**31  # no seed given: one is drawn and shown

    assert [j.id for j in alice.fine_tuning.jobs.list(metadata={"team": "red"})] == [job.id]
    assert [j.id for j in alice.fine_tuning.jobs.list(limit=1)] == [long.id, job.id]  # auto-paginates
    assert list(bob.fine_tuning.jobs.list()) == []
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.retrieve(job.id)

    done = _wait(alice, job.id, {"succeeded", "failed"})
    assert done.status == "succeeded" and done.fine_tuned_model and done.trained_tokens > 0, done
    events = list(alice.fine_tuning.jobs.list_events(job.id, limit=100))
    assert any(e.type == "metrics" and e.data["step"] == 4 for e in events)
    ckpts = list(alice.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in ckpts] == [4, 2]
    assert ckpts[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-4"

    # pause: the job leaves the engine at its next checkpoint; resume goes on from it
    _wait(alice, long.id, {"running"})
    assert alice.fine_tuning.jobs.pause(long.id).status == "paused"
    deadline = time.monotonic() + 60
    while not any("Paused at step" in e.message for e in alice.fine_tuning.jobs.list_events(long.id)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    step = live.store.get_job_any(long.id).step
    time.sleep(0.5)
    assert live.store.get_job_any(long.id).step == step and long.id not in live.worker.engine.states
    assert alice.fine_tuning.jobs.resume(long.id).status == "queued"
    _wait(alice, long.id, {"running"})
    assert any(
        "Resumed from the checkpoint" in e.message for e in alice.fine_tuning.jobs.list_events(long.id)
    )
    with pytest.raises(openai.ConflictError):
        alice.fine_tuning.jobs.resume(long.id)

    # models: the base, the fine-tuned model and its checkpoints; not bob's
    ids = [m.id for m in alice.models.list()]
    assert (
        ids[0] == live.base and done.fine_tuned_model in ids and ckpts[0].fine_tuned_model_checkpoint in ids
    )
    assert [m.id for m in bob.models.list()] == [live.base]
    with pytest.raises(openai.NotFoundError):
        bob.models.retrieve(done.fine_tuned_model)
    with pytest.raises(openai.NotFoundError):
        bob.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])

    # greedy chat through the API == `lorafleet generate` with the downloaded adapter: the same text, and
    # the same tokens (the API's logprobs bytes; generate's ids spelled by transformers' tokenizer)
    url = f"http://127.0.0.1:{live.port}/v1/adapters/{done.fine_tuned_model}/download"
    z = httpx.get(url, headers={"Authorization": f"Bearer {live.secrets['alice']}"})
    zipfile.ZipFile(io.BytesIO(z.content)).extractall(tmp_path)
    adapter_dir = tmp_path / done.fine_tuned_model
    prompt = "what is 3 plus 3?"
    msgs = [{"role": "user", "content": prompt}]
    r = alice.chat.completions.create(
        model=done.fine_tuned_model, messages=msgs, temperature=0, max_tokens=12, logprobs=True
    )
    assert r.choices[0].message.content.strip().replace("\n", " ") == _cli_generate(
        capsys, live.model_dir, adapter_dir, prompt, 12
    )
    api_tokens = [bytes(t.bytes) for t in r.choices[0].logprobs.content]
    assert api_tokens == _generate_tokens(live.model_dir, adapter_dir, prompt, 12)
    assert len(api_tokens) == r.usage.completion_tokens and all(
        t.logprob <= 0 for t in r.choices[0].logprobs.content
    )
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    base = alice.chat.completions.create(
        model=live.base, messages=msgs, temperature=0, max_tokens=12, logprobs=True
    )
    # the adapter is applied (after 4 small steps it moves the probabilities, if not yet the argmax)
    assert [t.logprob for t in base.choices[0].logprobs.content] != [
        t.logprob for t in r.choices[0].logprobs.content
    ]
    stream = alice.chat.completions.create(
        model=done.fine_tuned_model, messages=msgs, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    ck = alice.chat.completions.create(
        model=ckpts[0].fine_tuned_model_checkpoint, messages=msgs, temperature=0, max_tokens=12
    )
    assert ck.choices[0].message.content == r.choices[0].message.content  # the last checkpoint is the model
    c = alice.completions.create(
        model=done.fine_tuned_model, prompt="what is 2 plus", max_tokens=5, temperature=0
    )
    assert c.object == "text_completion" and 0 < c.usage.completion_tokens <= 5 and c.usage.prompt_tokens > 0
    assert c.choices[0].finish_reason in ("stop", "length") and c.choices[0].text
    text = "".join(x.choices[0].text for x in alice.completions.create(
        model=done.fine_tuned_model, prompt="what is 2 plus", max_tokens=5, temperature=0, stream=True))  # fmt: skip
    assert text == c.choices[0].text

    # bad requests are 4xx exceptions of the SDK
    with pytest.raises(openai.BadRequestError, match="did you mean 'rank'"):
        alice.fine_tuning.jobs.create(
            model=live.base, training_file=f.id, extra_body={"lorafleet": {"adapter": {"rnk": 4}}}
        )
    with pytest.raises(openai.BadRequestError, match="not served here"):
        alice.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=f.id)
    with pytest.raises(openai.BadRequestError):
        alice.chat.completions.create(model=live.base, messages=msgs, n=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{live.port}/v1", api_key="lft_nope").models.list()
    with pytest.raises(openai.PermissionDeniedError):
        alice.models.delete(live.base)

    assert alice.fine_tuning.jobs.cancel(long.id).status == "cancelled"
    assert alice.models.delete(done.fine_tuned_model).deleted
    with pytest.raises(openai.NotFoundError):
        alice.models.retrieve(done.fine_tuned_model)


def _random_adapter(live: Live, tenant: str, rank: int, seed: int) -> str:
    """A succeeded job's adapter with random non-zero weights (inference only needs its PEFT folder)."""
    model = load_model(live.model_dir)
    adapter_id = new_adapter_id(None)
    spec = AdapterSpec(
        name=adapter_id, rank=rank, alpha=2.0 * rank, target_modules=("q_proj", "v_proj", "o_proj")
    )
    add_adapter(model, spec)
    params = adapter_parameters(model, adapter_id)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    save_peft(live.dd.adapter_dir(adapter_id), spec, {k: p.detach() for k, p in params.items()})
    spec_json = {**JobCreate(training_file="file-" + "0" * 24).normalized(), "model": live.base}
    job = JobRecord(new_job_id(), tenant, "queued", spec_json, adapter_id, time.time())
    live.store.add_job(job)
    live.store.transition(job.id, "succeeded", ["queued"], finished_at=time.time())
    return adapter_id


def test_16_concurrent_chats_over_4_adapters_share_decode_steps_while_training(live, capsys):
    alice = live.client("alice")
    adapters = [_random_adapter(live, "alice", rank, seed) for rank, seed in [(2, 1), (4, 2), (8, 3), (4, 4)]]
    f = alice.files.create(
        file=("t.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS).encode()), purpose="fine-tune"
    )
    train = alice.fine_tuning.jobs.create(
        model=live.base, training_file=f.id, hyperparameters={"batch_size": 2},
        extra_body={"lorafleet": {"training": {**TRAINING, "max_steps": 100000, "save_every_steps": 1000}}},
    )  # fmt: skip
    _wait(alice, train.id, {"running"})
    models = [live.base, *adapters]
    requests = [(models[i % 5], f"question {i}: what is {i} plus {i}?", 6 + i % 5) for i in range(16)]

    def ask(req):
        model, prompt, n = req
        r = alice.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=n
        )
        return r.choices[0].message.content

    alone = [ask(r) for r in requests]
    assert len(set(alone)) > 1
    before = dict(live.worker.inference.stats)
    step0 = live.store.get_job_any(train.id).step
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone
    stats = live.worker.inference.stats
    print(f"\nconcurrent: max rows in one decode step {stats['max_rows_in_step']}, adapters in one step "
          f"{stats['max_adapters_in_step']}, decode steps {stats['decode_steps'] - before['decode_steps']}")  # fmt: skip
    assert stats["max_rows_in_step"] >= 8 and stats["max_adapters_in_step"] >= 3
    assert live.store.get_job_any(train.id).step > step0  # training went on meanwhile
    # a budget of one adapter: each request loads its adapter on demand and evicts the least recently used
    inf = live.worker.inference
    assert all(any(name.endswith(a) for name in inf.loaded_adapters) for a in adapters)
    inf.budget = max(inf._loaded.values())
    assert [ask(r) for r in requests[:5]] == alone[:5]
    assert len(inf.loaded_adapters) == 1 and inf.loaded_adapters[0].endswith(adapters[3])
    # the command-line client pauses and resumes too
    cli = ["--url", live.url.removesuffix("/v1"), "--token", live.secrets["alice"]]
    capsys.readouterr()
    assert cli_main(["jobs", "pause", train.id, *cli]) == 0 and capsys.readouterr().out.split() == [
        train.id,
        "paused",
    ]
    assert cli_main(["jobs", "resume", train.id, *cli]) == 0 and capsys.readouterr().out.split() == [
        train.id,
        "queued",
    ]
    alice.fine_tuning.jobs.cancel(train.id)
