"""The fine-tuning service: a REST jobs API over one shared base model (``lorafleet serve``).

    lorafleet tokens create --tenant alice --data-dir ./service-data
    lorafleet serve --base-model path/to/model --data-dir ./service-data

Modules: ``app`` (the FastAPI app; never imports torch) with its routers in ``api/`` (files, jobs, models,
inference, adapters, dashboard) and ``errors`` (OpenAI's error shape), ``jobrequest`` (the OpenAI-shaped job
request and lorafleet's extension field), ``completions`` (chat / completion requests), ``schemas``
(response bodies), ``inference`` (the worker's side of inference: continuous batching, adapter LRU),
``inprocess`` (API + worker in one process, for tests and benchmarks), ``store`` (the ``Store`` interface,
its SQLite and PostgreSQL backends, migrations, leases), ``fairshare`` (which tenant's job is claimed next),
``auth`` (tenants, hashed tokens), ``files`` (upload validation, ids and every path built from them),
``jobspec`` (REST job -> engine configs), ``worker`` (claims jobs under leases and trains them; its engine
events are recorded by ``worker_events``, its leases held in ``leases``), ``worker_process`` (the worker
process: flags, lock, heartbeat), ``server`` (API + supervised worker), ``client`` and ``commands`` (the
command line).
This package imports nothing on import, so ``lorafleet`` commands stay fast and torch-free until they train.
"""
