"""``lorafleet tenants``: weights and quotas set from the command line; flags not given stay as they are."""

from __future__ import annotations

import pytest

from lorafleet.cli import main as cli_main
from lorafleet.service.store import open_store


def test_tenants_set_keeps_what_is_not_given_and_none_lifts_a_quota(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'lorafleet.db'}"
    args = ["tenants", "set", "a", "--store", url]
    assert cli_main([*args, "--weight", "3", "--max-queued-jobs", "5", "--max-stored-mb", "1.5"]) == 0
    assert cli_main([*args, "--max-running-jobs", "2"]) == 0  # the others stay
    s = open_store(url)
    t = s.get_tenant("a")
    assert (t.weight, t.max_running_jobs, t.max_queued_jobs, t.max_stored_bytes) == (
        3.0,
        2,
        5,
        int(1.5 * 2**20),
    )
    s.close()
    assert cli_main([*args, "--max-queued-jobs", "none"]) == 0
    out = capsys.readouterr().out.splitlines()[-1]
    assert out.split() == [
        "a",
        "weight",
        "3",
        "max",
        "running",
        "2",
        "max",
        "queued",
        "-",
        "max",
        "stored",
        "1.5",
        "MB",
    ]
    with pytest.raises(SystemExit):
        cli_main([*args, "--max-running-jobs", "-1"])
    assert "must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["tenants", "set", "--help"])
    assert "object at" not in capsys.readouterr().out  # no default shown for flags that keep the setting
