"""Seed statistics of the learning benchmarks: mean ± std, Welch's two-sided test, and the verdict of two methods
(beyond seed spread when their means differ by more than the sum of their standard deviations)."""

import math
import statistics


def mean_std(values):
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _t_sf(t: float, df: float) -> float:
    """Upper tail P(T > t) of Student's t with `df` degrees of freedom (numeric integration; t >= 0)."""
    if math.isinf(t):
        return 0.0
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(x):
        return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))

    # P(0 < T < t) by Simpson's rule, then 0.5 minus it
    n = 2000
    h = t / n
    s = pdf(0) + pdf(t) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    return max(0.0, 0.5 - s * h / 3)


def welch(a, b):
    """Welch's t statistic and two-sided p-value of mean(a) - mean(b)."""
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    va, vb = sa**2 / len(a), sb**2 / len(b)
    if va + vb == 0:
        return (math.inf if ma != mb else 0.0), (0.0 if ma != mb else 1.0)
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va**2 / (len(a) - 1) if va else 0) + (vb**2 / (len(b) - 1) if vb else 0))
    return t, min(1.0, 2 * _t_sf(abs(t), df))


def verdict(pbsd, baseline):
    """`beat` / `lost` when |difference of means| > std(PBSD) + std(baseline) (seed spread), else `tied`."""
    mp, sp = mean_std(pbsd)
    mb, sb = mean_std(baseline)
    diff = mp - mb
    if abs(diff) > sp + sb:
        return ("beat" if diff > 0 else "lost"), diff
    return "tied", diff


def within_seed_spread(a: list[float], b: list[float]) -> bool | None:
    """Whether two sets of seed scores are indistinguishable here: mean ± std intervals overlap or Welch p ≥ 0.05
    (None with fewer than 2 seeds on a side)."""
    if len(a) < 2 or len(b) < 2:
        return None
    return verdict(a, b)[0] == "tied" or welch(a, b)[1] >= 0.05
