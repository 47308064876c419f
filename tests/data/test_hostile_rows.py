"""Hostile rows in training data files: too deep, or invalid Unicode, are ``file:line`` errors (issue 19)."""

from __future__ import annotations

import pytest

from lorafleet.data.sources import DataError, read_rows


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize(
    ("row", "said"),
    [('{"text": ' + "[" * 1000 + "]" * 1000 + "}", "nested"), ('{"text": "\\ud800"}', "surrogate")],
)
def test_hostile_row_names_file_and_line(tmp_path, suffix, row, said):
    good = '{"text": "fine"}'
    body = f"{good}\n{row}\n" if suffix == ".jsonl" else f"[{good},\n{row}]\n"
    path = tmp_path / f"d{suffix}"
    path.write_text(body)
    with pytest.raises(DataError) as e:
        read_rows(path)
    assert f"{path}:2" in str(e.value) and said in str(e.value), str(e.value)
