"""Cost of reading one JSON vector query in the ingress: raysearch's parser vs the two-step baseline.

  baseline   json.loads(body), then SearchJSON.model_validate(doc) (what the ingress did before)
  raysearch  raysearch.serve.api.parse_json_search(body, ...): SearchJSON.model_validate_json,
             parsing and validating in one pass, plus the checks that follow (k, shape, finite)

Body: {"vector": [DIM floats], "k": 10}, the unit vector written by json.dumps (17-digit floats,
what Python and most clients send). Median of --repeats timings of --n parses each.

Usage: python benchmarks/serve_parse.py [--dim 1280 --n 2000 --repeats 5]
"""

import argparse
import json
import os
import platform
import sys
import timeit

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def per_call_ms(fn, n: int, repeats: int) -> float:
    """Median over `repeats` runs of the time of one call, from `n` calls per run (ms)."""
    fn()
    return float(np.median(timeit.repeat(fn, number=n, repeat=repeats))) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from raysearch.serve.api import SearchJSON, parse_json_search

    q = np.random.default_rng(0).standard_normal(args.dim).astype(np.float32)
    body = json.dumps({"vector": (q / np.linalg.norm(q)).tolist(), "k": 10}).encode()
    baseline = per_call_ms(lambda: SearchJSON.model_validate(json.loads(body)), args.n, args.repeats)
    ours = per_call_ms(lambda: parse_json_search(body, args.dim, 64), args.n, args.repeats)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}; "
          f"body {len(body)} bytes ({args.dim} floats)")
    print(f"json.loads + model_validate     {baseline:.3f} ms")
    print(f"parse_json_search               {ours:.3f} ms   ({baseline / ours:.1f}x faster)")


if __name__ == "__main__":
    main()
