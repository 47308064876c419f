"""The ``--nproc`` flags of the worker and the server: bad values are one-line errors (exit 2), and the
ranks that torchrun starts get the worker's flags back (without ``--nproc``, which torchrun would take for
its own ``--nproc-per-node``, and without ``--parent-pid``: each rank watches torchrun)."""

from __future__ import annotations

from lorafleet.cli import main as cli_main
from lorafleet.service.worker_process import _rank_argv, build_parser


def test_bad_nproc_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    model = tmp_path / "model"  # only checked to exist before --nproc is
    model.mkdir()
    args = ["worker", "--data-dir", str(tmp_path), "--base-model", str(model)]
    assert cli_main([*args, "--nproc", "0"]) == 2
    assert "--nproc 0: give the number of pipeline stages, at least 1" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli_main([*args, "--nproc", "3"]) == 2
    err = capsys.readouterr().err
    assert "--nproc 3 but torchrun started WORLD_SIZE 2 processes: give --nproc 2" in err, err
    monkeypatch.delenv("WORLD_SIZE")
    serve = ["serve", "--data-dir", str(tmp_path), "--base-model", str(model), "--nproc", "-1"]
    assert cli_main(serve) == 2
    assert "--nproc must be > 0 (got -1)" in capsys.readouterr().err


def test_the_ranks_get_the_worker_flags_back():
    argv = ["--data-dir", "/d", "--base-model", "/m", "--nproc", "2", "--parent-pid", "7", "--no-inference",
            "--max-concurrent-tasks", "3", "--poll-interval", "0.1", "--worker-id", "w1"]  # fmt: skip
    args = build_parser().parse_args(argv)
    again = _rank_argv(args)
    assert "--nproc" not in again and "--parent-pid" not in again
    back = vars(build_parser().parse_args(again))
    assert {k: v for k, v in back.items() if k not in ("nproc", "parent_pid")} == {
        k: v for k, v in vars(args).items() if k not in ("nproc", "parent_pid")
    }
