"""The fine-tuning service: a REST jobs API over one shared base model (``lorafleet serve``).

    lorafleet tokens create --tenant alice --data-dir ./service-data
    lorafleet serve --base-model path/to/model --data-dir ./service-data

Modules: ``app`` (FastAPI routes; never imports torch), ``schemas`` (request and response bodies), ``store``
(the ``Store`` interface and its SQLite implementation), ``auth`` (tenants, hashed tokens), ``files`` (upload
validation, ids and every path built from them), ``jobspec`` (REST job -> engine configs), ``worker`` (the
training process), ``server`` (API + supervised worker), ``client`` and ``commands`` (the command line).
This package imports nothing on import, so ``lorafleet`` commands stay fast and torch-free until they train.
"""
