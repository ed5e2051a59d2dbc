"""Mean and Student-t confidence interval over seeds, and the paired difference of two encoders.

A few seeds of a small run scatter by several points, so a single draw cannot rank two encoders: the evaluation
demo reports, per encoder, the mean over seeds with its t interval, and for two encoders probed on the same seeds
the interval of the per-seed (paired) difference. A difference is called one only when that interval excludes 0.
It also compares two encoders' seed-to-seed spread (variance ratio, F-test).
"""
import math
from dataclasses import dataclass
from typing import Sequence, Tuple


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    sd: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes(self, value: float = 0.0) -> bool:
        return not self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.half_width:.2f}" if self.n > 1 else f"{self.mean:.2f}"


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of `values` and its two-sided Student-t interval (sample sd, n - 1 degrees of freedom); with one
    value the interval is unbounded (nothing is known about the spread)."""
    from scipy.stats import t  # scipy comes with scikit-learn; its t quantile saves us writing an inverse CDF
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci: expected at least one value, got none")
    if not 0 < level < 1:
        raise ValueError(f"mean_ci: level expected in (0, 1), got {level}")
    m = sum(xs) / n
    if n == 1:
        return Interval(m, -math.inf, math.inf, 1, math.nan)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(m, m - h, m + h, n, sd)


def paired_diff(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """Interval of mean(a - b) over paired draws (same seed for a[i] and b[i]): the seed-to-seed variation that
    both share cancels, so it is narrower than comparing the two separate intervals."""
    if len(a) != len(b):
        raise ValueError(f"paired_diff: expected two samples of the same length, got {len(a)} and {len(b)}")
    return mean_ci([x - y for x, y in zip(a, b)], level)


def spread_ratio(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
    """(variance of a / variance of b, two-sided p of the F-test that both have the same variance): whether one
    encoder's top-1 scatters more from seed to seed than another's (sample variances, n - 1 degrees of freedom).
    With no spread in b the ratio is inf (or nan if a has none either) and p is nan."""
    from scipy.stats import f
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"spread_ratio: expected at least 2 values in each sample, got {len(a)} and {len(b)}")
    va, vb = mean_ci(a).sd ** 2, mean_ci(b).sd ** 2
    if vb == 0:
        return (math.inf if va > 0 else math.nan), math.nan
    ratio = va / vb
    tail = min(f.cdf(ratio, len(a) - 1, len(b) - 1), f.sf(ratio, len(a) - 1, len(b) - 1))
    return ratio, float(min(1.0, 2 * tail))


def verdict(d: Interval, name_a: str, name_b: str) -> str:
    """One line: which of the two is better, or that the seeds cannot tell them apart."""
    if d.excludes(0.0):
        better, worse = (name_a, name_b) if d.mean > 0 else (name_b, name_a)
        return f"{better} beats {worse} by {abs(d.mean):.2f} points (95% CI of the paired difference {d.low:+.2f} .. {d.high:+.2f})"
    return (f"no difference between {name_a} and {name_b} at this scale: the 95% CI of the paired difference, "
            f"{d.low:+.2f} .. {d.high:+.2f}, contains 0")
