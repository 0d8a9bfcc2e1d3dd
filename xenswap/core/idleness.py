"""Idleness detection and idle-period prediction (pure: samples in, decisions out).

Heuristic from the poster: a VM is idle when its vCPUs do not use their scheduling quantum. We sample the
cumulative CPU time of every vCPU thread; each sampling interval is one "quantum" and its usage is the
fraction of (interval x vCPUs) the vCPUs actually ran. An idle TCG guest uses ~0.5 % of a core (timer
ticks), a busy one tens of percent, so a small threshold separates them well.

Idle-period predictors follow Golding, Bosch, Staelin, Sullivan, Wilkes, "Idleness is not sloth" (USENIX
1995): a *fixed timeout* (act once the period has lasted T), a *moving average* of previous period lengths
(act at once when the average says the period will be long enough to pay back), and *adaptive back-off*
(a timeout that doubles after a false alarm and halves after a good call). ``evaluate`` replays a recorded
trace through each predictor and scores it: how much idle time was spent paged out, how many actions were
false alarms (the VM woke before the page-out paid back).
"""

from __future__ import annotations

import bisect
import csv
import io
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_IDLE_THRESHOLD = 0.05  # fraction of the quantum; idle TCG guests measure ~0.005
DEFAULT_BREAKEVEN_S = 10.0  # an idle period shorter than this after acting makes the page-out a loss


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds of each vCPU at wall time ``t`` (seconds, any epoch)."""

    t: float
    vcpu_seconds: tuple[float, ...]


def quantum_usage(prev: CpuSample, cur: CpuSample) -> float:
    """Fraction of the interval's capacity (interval x vCPUs) the vCPUs ran, clamped to [0, 1]."""
    interval = cur.t - prev.t
    ncpu = max(1, min(len(prev.vcpu_seconds), len(cur.vcpu_seconds)))
    if interval <= 0:
        return 0.0
    used = sum(max(0.0, c - p) for p, c in zip(prev.vcpu_seconds, cur.vcpu_seconds, strict=False))
    return max(0.0, min(1.0, used / (interval * ncpu)))


@dataclass
class IdlenessDetector:
    """Feeds on CPU samples; knows whether the VM is idle, since when, and the lengths of past idle periods."""

    threshold: float = DEFAULT_IDLE_THRESHOLD
    last: CpuSample | None = None
    idle_since: float | None = None
    busy_since: float | None = None
    last_usage: float | None = None
    completed_periods: list[float] = field(default_factory=list)

    def feed(self, sample: CpuSample) -> float | None:
        """Account one sample; returns the usage of the quantum it closes (None for the first sample)."""
        prev, self.last = self.last, sample
        if prev is None:
            return None
        usage = quantum_usage(prev, sample)
        self.last_usage = usage
        if usage < self.threshold:
            if self.idle_since is None:
                self.idle_since = prev.t
                self.busy_since = None
        else:
            if self.idle_since is not None:
                self.completed_periods.append(prev.t - self.idle_since)
                del self.completed_periods[:-256]  # bounded history
            self.idle_since = None
            if self.busy_since is None:
                self.busy_since = prev.t
        return usage

    @property
    def idle(self) -> bool:
        return self.idle_since is not None

    def idle_for(self, now: float | None = None) -> float:
        if self.idle_since is None:
            return 0.0
        now = self.last.t if now is None and self.last else now
        return max(0.0, (now or 0.0) - self.idle_since)

    def to_json(self) -> dict:
        d = asdict(self)
        d["last"] = None if self.last is None else [self.last.t, list(self.last.vcpu_seconds)]
        return d

    @classmethod
    def from_json(cls, d: dict) -> IdlenessDetector:
        d = dict(d)
        last = d.pop("last", None)
        det = cls(**d)
        det.last = None if last is None else CpuSample(last[0], tuple(last[1]))
        return det


# ---------------------------------------------------------------- predictors


class IdlePredictor:
    """Base: history of idle-period lengths and the "past predicts the future" length estimate."""

    name = "base"

    def __init__(self, history: Sequence[float] = ()) -> None:
        self.history: list[float] = sorted(history)[-256:]

    def should_act(self, elapsed: float) -> bool:
        raise NotImplementedError

    def observe(self, length: float, acted_at: float | None, breakeven: float) -> None:
        """An idle period ended after ``length`` s; ``acted_at`` is when we acted in it (None: never)."""
        bisect.insort(self.history, length)
        if len(self.history) > 256:
            self.history.pop(len(self.history) // 2)  # keep the extremes, thin the middle

    def predicted_length(self, elapsed: float) -> float:
        """Predicted total length of an idle period that has lasted ``elapsed`` s: the median of past periods
        at least that long (Golding's conditional estimate), or twice the elapsed time without history."""
        i = bisect.bisect_left(self.history, elapsed)
        longer = self.history[i:]
        if not longer:
            return max(2 * elapsed, elapsed + 1.0)
        return longer[len(longer) // 2]

    def state(self) -> dict:
        return {"name": self.name, "history": self.history}


class FixedTimeout(IdlePredictor):
    name = "fixed-timeout"

    def __init__(self, timeout: float = 30.0, history: Sequence[float] = ()) -> None:
        super().__init__(history)
        self.timeout = timeout

    def should_act(self, elapsed: float) -> bool:
        return elapsed >= self.timeout


class MovingAverage(IdlePredictor):
    """Exponential moving average of past period lengths; act as soon as it promises more than breakeven."""

    name = "moving-average"

    def __init__(self, alpha: float = 0.3, breakeven: float = DEFAULT_BREAKEVEN_S, min_wait: float = 2.0,
                 fallback_timeout: float = 30.0, history: Sequence[float] = ()) -> None:
        super().__init__(history)
        self.alpha, self.breakeven, self.min_wait, self.fallback_timeout = alpha, breakeven, min_wait, fallback_timeout
        self.average: float | None = None

    def should_act(self, elapsed: float) -> bool:
        if elapsed < self.min_wait:
            return False
        # The average promises enough idle time left to pay back a page-out; a period that has already
        # outlived the average falls back to a plain timeout (otherwise long periods would never be caught).
        if self.average is not None and self.average - elapsed >= self.breakeven:
            return True
        return elapsed >= self.fallback_timeout

    def observe(self, length: float, acted_at: float | None, breakeven: float) -> None:
        super().observe(length, acted_at, breakeven)
        self.average = length if self.average is None else self.alpha * length + (1 - self.alpha) * self.average

    def predicted_length(self, elapsed: float) -> float:
        if self.average is None:
            return super().predicted_length(elapsed)
        return max(self.average, elapsed)


class AdaptiveBackoff(IdlePredictor):
    """Timeout that doubles after a false alarm (woke within breakeven of acting) and halves after a good call."""

    name = "adaptive-backoff"

    def __init__(self, timeout: float = 10.0, min_timeout: float = 2.0, max_timeout: float = 600.0,
                 history: Sequence[float] = ()) -> None:
        super().__init__(history)
        self.timeout, self.min_timeout, self.max_timeout = timeout, min_timeout, max_timeout

    def should_act(self, elapsed: float) -> bool:
        return elapsed >= self.timeout

    def observe(self, length: float, acted_at: float | None, breakeven: float) -> None:
        super().observe(length, acted_at, breakeven)
        if acted_at is None:
            if length >= self.timeout:  # cannot happen in replay; guard anyway
                self.timeout = max(self.min_timeout, self.timeout / 2)
            return
        if length - acted_at < breakeven:
            self.timeout = min(self.max_timeout, self.timeout * 2)
        else:
            self.timeout = max(self.min_timeout, self.timeout / 2)


PREDICTORS = {cls.name: cls for cls in (FixedTimeout, MovingAverage, AdaptiveBackoff)}


def make_predictor(name: str, **kwargs: float) -> IdlePredictor:
    try:
        return PREDICTORS[name](**kwargs)
    except KeyError:
        from xenswap.errors import SpecError

        raise SpecError(f"unknown idle predictor {name!r} (known: {', '.join(PREDICTORS)})") from None


# ---------------------------------------------------------------- traces and evaluation


def load_trace(source: str | Path | io.TextIOBase) -> list[CpuSample]:
    """A trace is CSV with a header ``t,vcpu0[,vcpu1...]``: wall seconds and cumulative vCPU seconds."""
    text = Path(source).read_text() if isinstance(source, str | Path) else source.read()
    rows = [r for r in csv.reader(io.StringIO(text)) if r and not r[0].startswith("#")]
    return [CpuSample(float(r[0]), tuple(float(x) for x in r[1:])) for r in rows[1:]]


def dump_trace(samples: Iterable[CpuSample]) -> str:
    samples = list(samples)
    ncpu = len(samples[0].vcpu_seconds) if samples else 1
    out = io.StringIO()
    out.write(",".join(["t"] + [f"vcpu{i}" for i in range(ncpu)]) + "\n")
    t0 = samples[0].t if samples else 0.0
    for s in samples:
        out.write(",".join([f"{s.t - t0:.3f}"] + [f"{v:.6f}" for v in s.vcpu_seconds]) + "\n")
    return out.getvalue()


def idle_periods(samples: Sequence[CpuSample], threshold: float = DEFAULT_IDLE_THRESHOLD
                 ) -> list[tuple[float, float]]:
    """(start, length) of every idle period in a trace, including a final one still open at the end."""
    det = IdlenessDetector(threshold=threshold)
    periods: list[tuple[float, float]] = []
    for s in samples:
        was_since = det.idle_since
        det.feed(s)
        if was_since is not None and det.idle_since is None:
            periods.append((was_since, det.completed_periods[-1]))
    if det.idle_since is not None and det.last is not None:
        periods.append((det.idle_since, det.last.t - det.idle_since))
    return periods


@dataclass
class Evaluation:
    predictor: str
    periods: int
    idle_s: float
    acted: int
    false_alarms: int  # acted, but the VM woke within breakeven: page-out cost not paid back
    missed: int  # a period long enough to pay back that we never acted in
    captured_s: float  # idle seconds spent after acting (what paging out saved)

    @property
    def captured_fraction(self) -> float:
        return self.captured_s / self.idle_s if self.idle_s else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "captured_fraction": round(self.captured_fraction, 4)}


def evaluate(predictor: IdlePredictor, samples: Sequence[CpuSample], step: float | None = None,
             breakeven: float = DEFAULT_BREAKEVEN_S, threshold: float = DEFAULT_IDLE_THRESHOLD) -> Evaluation:
    """Replay a trace: in each idle period, find when the predictor would act (checked every ``step`` s,
    default the trace's sampling interval), score it, then let it learn the period's length."""
    periods = idle_periods(samples, threshold)
    if step is None:
        gaps = [b.t - a.t for a, b in itertools.pairwise(samples)]
        step = sorted(gaps)[len(gaps) // 2] if gaps else 1.0
    ev = Evaluation(predictor.name, len(periods), sum(length for _, length in periods), 0, 0, 0, 0.0)
    for _, length in periods:
        acted_at = None
        elapsed = 0.0
        while elapsed <= length:
            if predictor.should_act(elapsed):
                acted_at = elapsed
                break
            elapsed += step
        if acted_at is None:
            if length >= breakeven:
                ev.missed += 1
        else:
            ev.acted += 1
            ev.captured_s += length - acted_at
            if length - acted_at < breakeven:
                ev.false_alarms += 1
        predictor.observe(length, acted_at, breakeven)
    return ev


def evaluate_all(samples: Sequence[CpuSample], breakeven: float = DEFAULT_BREAKEVEN_S,
                 threshold: float = DEFAULT_IDLE_THRESHOLD) -> list[Evaluation]:
    return [evaluate(cls(), samples, breakeven=breakeven, threshold=threshold) for cls in PREDICTORS.values()]


def fmt_seconds(s: float) -> str:
    return "inf" if math.isinf(s) else f"{s:.0f}s"
