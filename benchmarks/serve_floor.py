"""Ray Serve's own round trip on this machine: the floor under `raysearch serve`'s latency.

Two trivial FastAPI routes on Ray Serve, asked over HTTP on 127.0.0.1 by one sequential client with
the same JSON body as a raysearch vector query (1280 floats):
  /direct   the ingress parses the body and answers (proxy -> ingress)
  /fan      the ingress also calls --shards trivial deployments at once and awaits them all
            (proxy -> ingress -> shards: the shape of a raysearch query, with no search in it)
Compare its p50 with `benchmarks/serve_load.py`'s "serve sequential" row: the difference is what
raysearch's own code (validation, FAISS search, merge, id lookup) adds.

Usage: python benchmarks/serve_floor.py [--shards 3 --requests 300]
"""


import argparse
import asyncio
import os
import platform
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--dim", type=int, default=1280)
    args = ap.parse_args()

    import httpx
    import ray
    from fastapi import FastAPI, Request
    from ray import serve

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Leaf:
        async def __call__(self, x):
            return x

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(api)
    class Ingress:
        def __init__(self, leaves):
            self.leaves = leaves

        @api.post("/direct")
        async def direct(self, req: Request):
            body = await req.json()
            return {"n": len(body["vector"])}

        @api.post("/fan")
        async def fan(self, req: Request):
            body = await req.json()
            out = await asyncio.gather(*[leaf.remote(len(body["vector"])) for leaf in self.leaves])
            return {"n": sum(out)}

    leaves = [Leaf.options(name=f"Leaf{i}").bind() for i in range(args.shards)]
    serve.run(Ingress.bind(leaves), name="serve-floor", route_prefix="/")
    body = {"vector": np.random.default_rng(0).random(args.dim).tolist()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; ray {ray.__version__}; "
          f"{args.requests} sequential requests per route")
    with httpx.Client(base_url="http://127.0.0.1:8000", timeout=30) as client:
        for path in ("/direct", "/fan"):
            for _ in range(20):
                client.post(path, json=body)
            times = []
            for _ in range(args.requests):
                t = time.perf_counter()
                r = client.post(path, json=body)
                times.append(time.perf_counter() - t)
                r.raise_for_status()
            ms = 1000 * np.asarray(times)
            print(f"{path:<8} p50 {np.median(ms):6.2f} ms   p99 {np.percentile(ms, 99):6.2f} ms")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
