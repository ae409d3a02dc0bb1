"""Progress bars that count training steps and give no time estimate while a step is compiling.

tqdm's own estimate divides by the time so far, which on the first segment of each run is mostly
compilation; :class:`StepBar` shows ``compiling`` instead until it has seen a segment that ran compiled code,
and estimates the time left only from such segments.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]"


class StepBar:
    """A tqdm bar over ``total`` training steps.

    ``advance(n, warm)``: ``n`` more steps done; ``warm`` says they ran already-compiled code (the first
    segment of a run is not warm). The estimate is (steps left) x (seconds per warm step so far).
    """

    def __init__(self, total: int, desc: str) -> None:
        self._bar = tqdm(total=total, desc=desc, bar_format=_FORMAT)
        self._warm_steps, self._warm_s = 0, 0.0
        self._last = time.perf_counter()
        self._label = ""
        self._bar.set_postfix_str("compiling", refresh=False)

    def set_label(self, label: str) -> None:
        """Name the run in progress (shown before the estimate)."""
        self._label = label
        self._show()

    def advance(self, n: int, warm: bool) -> None:
        now = time.perf_counter()
        if warm:
            self._warm_steps += n
            self._warm_s += now - self._last
        self._last = now
        self._bar.update(n)
        self._show()

    def start_run(self) -> None:
        """A new run starts (its first segment compiles): the time since the last segment is not counted."""
        self._last = time.perf_counter()

    def _show(self) -> None:
        parts = [self._label] if self._label else []
        if self._warm_steps == 0:
            parts.append("compiling")
        else:
            left = (self._bar.total - self._bar.n) * self._warm_s / self._warm_steps
            parts.append(f"~{int(left // 60)}:{int(left % 60):02d} left")
        self._bar.set_postfix_str(", ".join(parts))

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
