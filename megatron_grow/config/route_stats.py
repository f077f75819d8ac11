"""The routing-statistics file: per-layer expert routing shares measured on calibration tokens.

``megatron-grow route-stats`` writes it; ``growth.upcycle.utility_stats`` reads it (docs/growth.md,
"Expert upcycling"). Plain JSON, no torch, so the recipe checks can read it:

    {"format": "megatron_grow.route_stats/1", "num_layers": L, "num_experts": E, "tokens": N,
     "topk": k, "checkpoint": "...", "data": "...", "counts": [[...E...] x L], "shares": [[...E...] x L]}

``counts[l][e]`` is how many of the N calibration tokens layer ``l`` routed to expert ``e`` (a
token counts once per chosen expert, so each row sums to N*k); ``shares[l][e] = counts[l][e] /
(N*k)``, each row summing to 1.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

from megatron_grow.errors import ConfigError

FORMAT = "megatron_grow.route_stats/1"


def shares_from_counts(counts: list[list[float]]) -> list[list[float]]:
    """Each layer's counts over their sum (a layer that routed nothing gets equal shares)."""
    out = []
    for row in counts:
        total = float(sum(row))
        out.append([float(c) / total for c in row] if total > 0 else [1.0 / len(row)] * len(row))
    return out


def per_layer_shares(shares: list[list[float]]) -> tuple[tuple[float, ...], ...]:
    """The utility of each expert in each layer: that layer's own routing shares (expert ``e`` of layer
    0 and expert ``e`` of layer 5 are unrelated, so each layer gets its own allocation)."""
    return tuple(tuple(float(x) for x in row) for row in shares)


def file_sha256(path: str) -> str:
    """SHA-256 of the file's bytes (what the growth record names the statistics by)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_route_stats(path: str, key: str) -> dict:
    """The statistics in ``path``, checked; a ``ConfigError`` naming ``key`` when unreadable or malformed."""
    if not os.path.isfile(path):
        raise ConfigError([f"{key}: {path} does not exist (write it with megatron-grow route-stats)"])
    try:
        with open(path) as f:
            stats = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError([f"{key}: {path} is not a readable JSON file ({e})"]) from None
    shares = stats.get("shares") if isinstance(stats, dict) else None
    if (not isinstance(stats, dict) or stats.get("format") != FORMAT or not isinstance(shares, list) or not shares
            or not all(isinstance(r, list) and len(r) == len(shares[0]) and r for r in shares)
            or not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for r in shares for x in r)):
        raise ConfigError([f"{key}: {path} is not a {FORMAT} file (a 'shares' list of equal-length rows of "
                           "non-negative numbers)"])
    return stats


def write_route_stats(path: str, stats: dict) -> None:
    """Write ``stats`` atomically (a temporary file renamed over ``path``)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, **stats}, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
