"""Live progress in the terminal: one bar per task with its loss and tokens/s (rich)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["ProgressView"]


class ProgressView:
    """Follows an ``Engine``'s tasks; ``refresh()`` after each micro-batch, ``close()`` at the end."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._progress = Progress(
            TextColumn("{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]:<9} loss {task.fields[loss]:>7} {task.fields[tps]:>8} tok/s"),
            TimeElapsedColumn(),
            transient=False,
        )
        self._ids: dict[str, int] = {}
        self._progress.start()

    def refresh(self) -> None:
        for name, st in self.engine.states.items():
            if name not in self._ids:
                self._ids[name] = self._progress.add_task(
                    name, total=st.total_steps, status="", loss="", tps=""
                )
            tps = f"{st.tokens / st.busy_s:,.0f}" if st.busy_s > 0 else ""
            loss = f"{st.last_loss:.4f}" if st.last_loss is not None else ""
            self._progress.update(self._ids[name], completed=st.step, status=st.status, loss=loss, tps=tps)

    def close(self) -> None:
        self.refresh()
        self._progress.stop()
