"""``python -m lorafleet`` is the same as the ``lorafleet`` command."""

from .cli import entry

entry()
