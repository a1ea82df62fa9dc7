"""One clean progress display on the driver, fed by rank 0 of the training workers.

Rank 0 pushes small records (step, loss, eval loss, seconds per step) into a Ray queue without waiting; a
thread on the driver drains it and draws one line: a live bar (step, loss, eval loss, tokens/s, ETA) on a
terminal, or one plain line per logging step when the output is a file or a pipe (``ray job logs``, CI).
Worker output stays out of the way (see ``rayft.train_loop.quiet_libraries``); RAYFT_VERBOSE=1 shows it.
"""

from __future__ import annotations

import sys
import threading
import time


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressDisplay:
    """``with ProgressDisplay(name) as display: ... loop_config(progress=display.queue)``."""

    def __init__(self, name: str, enabled: bool = True, stream=None):
        self.name, self.enabled = name, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.queue = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        self.state = {"step": 0, "total": None, "loss": None, "eval_loss": None, "tokens_per_s": None}
        self._t_start, self._step_start = None, 0
        self.lines: list[str] = []  # what was printed in line mode (tests read it)

    def __enter__(self) -> ProgressDisplay:
        if not self.enabled:
            return self
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._thread = threading.Thread(target=self._drain, name="rayft-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._drain_once()
        if self._bar is not None:
            self._bar.close()
        import ray

        ray.kill(self.queue.actor)

    def _drain(self) -> None:
        while not self._stop.is_set():
            self._drain_once()
            time.sleep(0.2)

    def _drain_once(self) -> None:
        try:
            items = self.queue.get_nowait_batch(self.queue.qsize())
        except Exception:  # the queue actor is gone (job ending): nothing more to show
            return
        for item in items:
            self.update(item)

    def update(self, r: dict) -> None:
        st = self.state
        st["total"] = r.get("total", st["total"])
        if r.get("event") == "start":
            st["step"], self._t_start, self._step_start = r["step"], time.perf_counter(), r["step"]
            if r["step"]:
                self._print(f"{self.name}: resumed from checkpoint at step {r['step']}/{st['total']}")
            return
        if r.get("event") == "done":
            return
        st["step"] = max(st["step"], r.get("step", 0))
        for key in ("loss", "eval_loss", "tokens_per_s"):
            if r.get(key) is not None:
                st[key] = r[key]
        if r.get("show"):  # a driver-side loop (RL) names its own fields: {"reward": "0.31", ...}
            st["show"] = {**st.get("show", {}), **r["show"]}
        if self.tty:
            self._draw()
        elif r.get("logged"):
            self._print(self.line())

    def eta(self) -> float | None:
        st = self.state
        done = st["step"] - self._step_start
        if not done or st["total"] is None or self._t_start is None:
            return None
        return (time.perf_counter() - self._t_start) / done * (st["total"] - st["step"])

    def line(self) -> str:
        st = self.state
        parts = [f"{self.name}: step {st['step']}/{st['total']}"]
        if st["loss"] is not None:
            parts.append(f"loss {st['loss']:.4f}")
        if st["eval_loss"] is not None:
            parts.append(f"eval {st['eval_loss']:.4f}")
        if st["tokens_per_s"] is not None:
            parts.append(f"{st['tokens_per_s']:.0f} tok/s")
        parts += [f"{k} {v}" for k, v in st.get("show", {}).items()]
        parts.append(f"ETA {_fmt_eta(self.eta())}")
        return "  ".join(parts)

    def _print(self, text: str) -> None:
        self.lines.append(text)
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _draw(self) -> None:
        from tqdm import tqdm

        st = self.state
        if self._bar is None:
            self._bar = tqdm(total=st["total"], desc=self.name, file=self.stream, dynamic_ncols=True,
                             bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")
        self._bar.n = st["step"]
        post = [f"loss {st['loss']:.4f}" if st["loss"] is not None else "",
                f"eval {st['eval_loss']:.4f}" if st["eval_loss"] is not None else "",
                f"{st['tokens_per_s']:.0f} tok/s" if st["tokens_per_s"] is not None else "",
                *(f"{k} {v}" for k, v in st.get("show", {}).items())]
        self._bar.set_postfix_str("  ".join(p for p in post if p), refresh=False)
        self._bar.refresh()
