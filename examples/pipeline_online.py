"""The pipeline as an online trainer from Python: tasks join while others train.

    torchrun --nproc-per-node 2 examples/pipeline_online.py CONFIG.yaml --late TASK [--after-steps 2]

Every rank builds a ``PipelineTrainer`` (its stage's layers); stage 0 adds every task of the config but
the ``--late`` ones, trains, adds the late ones once some task has done ``--after-steps`` optimizer steps,
and trains until all are done; the other stages follow. Outputs as ``lorafleet train`` writes them
(``adapters/``, per-stage ``checkpoints/``, ``metrics.jsonl``), plus ``events.jsonl``: the trainer's typed
events in the order it emitted them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from lorafleet.config import load_config
from lorafleet.parallel import PipelineTrainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--late", action="append", default=[], help="a task added while the others train")
    p.add_argument("--after-steps", type=int, default=2)
    args = p.parse_args()
    cfg = load_config(args.config)
    trainer = PipelineTrainer(cfg)
    if not trainer.is_coordinator:
        trainer.follow()
        return
    events = []
    trainer.subscribe(lambda ev: events.append({"event": type(ev).__name__, **asdict(ev)}))
    datasets = {d.name: d for d in cfg.datasets}
    adapters = {a.name: a for a in cfg.adapters}

    def add(task) -> None:
        ev = datasets[task.eval_dataset] if task.eval_dataset else None
        trainer.add_task(datasets[task.dataset], adapters[task.adapter], task, ev)

    late = [t for t in cfg.tasks if t.name in args.late]
    for task in cfg.tasks:
        if task not in late:
            add(task)
    while trainer.run_once():
        if late and any(st.step >= args.after_steps for st in trainer.states.values()):
            print(f"adding {[t.name for t in late]} while {sorted(trainer.states)} train", flush=True)
            for task in late:
                add(task)
            late = []
    trainer.close()
    for name, st in trainer.states.items():
        print(f"{name}: {st.status} at step {st.step}/{st.total_steps}, loss {st.last_loss}", flush=True)
    Path(cfg.output_dir, "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


if __name__ == "__main__":
    main()
