"""Minimum-cost bipartite assignment (the Hungarian step of DETR-style set losses), in numpy.

Hugging Face's DETR-family losses match predictions to ground truth with
``scipy.optimize.linear_sum_assignment``; scipy is not a dependency of agvm-ds (nor of
``transformers``), so :mod:`agvm_ds.models.foreign.hf_detr` hands them this function where
scipy is missing. Same call and same answer: ``cost`` ``[n, m]`` (any array-like, torch CPU
tensors included) → ``(rows, cols)``, ``min(n, m)`` pairs, rows ascending, of least total
cost. The algorithm is the shortest-augmenting-path form of the Hungarian method with
potentials (one row added per round, Dijkstra over the columns, O(n² m)); tested against a
brute force over every assignment in tests/test_hf_detr.py.
"""

from __future__ import annotations

import numpy as np

__all__ = ["linear_sum_assignment"]


def linear_sum_assignment(cost) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(cost, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"linear_sum_assignment: cost must be 2-d, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("linear_sum_assignment: cost contains NaN or infinity")
    if a.shape[0] > a.shape[1]:  # the search adds rows, so it needs rows <= columns
        cols, rows = _assign(a.T)
        order = np.argsort(rows, kind="stable")
        return rows[order], cols[order]
    return _assign(a)


def _assign(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, m = a.shape
    # column 0 is a virtual start column; owner[j] is the 1-based row holding column j (0: free)
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=np.int64)
    via = np.zeros(m + 1, dtype=np.int64)
    for row in range(1, n + 1):
        owner[0] = row
        col = 0
        dist = np.full(m + 1, np.inf)
        done = np.zeros(m + 1, dtype=bool)
        while True:  # grow a shortest-path tree from ``row`` until it reaches a free column
            done[col] = True
            r = owner[col]
            reduced = a[r - 1] - u[r] - v[1:]
            open_ = ~done[1:]
            better = open_ & (reduced < dist[1:])
            dist[1:][better] = reduced[better]
            via[1:][better] = col
            candidates = np.where(open_, dist[1:], np.inf)
            nxt = int(np.argmin(candidates)) + 1
            delta = candidates[nxt - 1]
            # keep reduced costs non-negative: tree rows up, tree columns down, the rest closer
            u[owner[done]] += delta
            v[done] -= delta
            dist[1:][open_] -= delta
            col = nxt
            if owner[col] == 0:
                break
        while col:  # flip the path's assignments back to the start column
            prev = via[col]
            owner[col] = owner[prev]
            col = prev
    cols = np.nonzero(owner[1:])[0]
    rows = owner[1:][cols] - 1
    order = np.argsort(rows, kind="stable")
    return rows[order].astype(np.int64), cols[order].astype(np.int64)
