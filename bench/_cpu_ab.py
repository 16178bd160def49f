"""Shared by the CPU pytest-benchmark files: interleaved A/B timing and the results CSV they write."""
import csv
import datetime
import os
import statistics
import time

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def interleaved_medians(fns, reps):
    """Runs each callable once to warm up, then `reps` rounds of all of them in turn (A, B, A, B, ...), so
    that machine load hits every candidate alike. Returns (median seconds, IQR / median) per callable."""
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
    out = []
    for ts in times:
        q = statistics.quantiles(ts, n=4)
        out.append((statistics.median(ts), (q[2] - q[0]) / statistics.median(ts)))
    return out


def write_rows_csv(rows, name):
    """bench/results/cpu-<date>-<name>.csv from a list of dicts (nothing when `rows` is empty)."""
    if not rows:
        return None
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"cpu-{datetime.date.today():%Y%m%d}-{name}.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
