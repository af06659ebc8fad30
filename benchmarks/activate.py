"""Active indexing on real photographs: recall@1 of edited copies, passive vs activated.

Set: scikit-image's bundled photographs cut into separated crops (raysearch's copy-detection set
writer): --references crops are the images to protect, --background crops of other photographs
are indexed beside them as distractors. One index over both, default model, a strongly
compressing IVF-PQ (--index, default IVF32,PQ8x8: 8 bytes per 1280-d vector).

For each activation variant (--variants, `name:key=value,...` over ActivateConfig fields; the
first, "paper", is the method's published settings) the references are activated by the Ray
pipeline, then every edit in --edits is applied with the same seed to the passive (original) and
the activated image and both are searched: recall@1 = the image itself comes first. The baseline
(passive) is measured in the same run on the same index and edits.

Reported per variant: recall@1 per edit (passive / activated), the mean over edits other than
"none" and their ratio, mean PSNR / SSIM, activation images/s on this machine. Beside them, the
same edited copies searched exactly over the stored (unquantised) vectors: the passive column is
what the model alone keeps under each edit, so the gap between it and the index's passive recall
is what the compression loses; and how many references share their code with another vector
(the index cannot rank those first at all).

Usage:
  python benchmarks/activate.py [--references 200 --background 400 --activate N --workdir bench-out/activate]
         [--variants "paper:;lr0.3-aug2:lr=0.3,augment=2;rank:loss=rank,lr=0.5,augment=3"] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EDITS = "none,crop,center_crop,rotate,color_jitter,blur,jpeg,resize,overlay,combo"


def parse_value(text: str) -> int | float | str:
    """An option value: int, else float, else the string itself (e.g. loss=rank)."""
    text = text.strip()
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_variants(text: str) -> list[tuple[str, dict]]:
    out = []
    for item in [v for v in text.split(";") if v.strip()]:
        name, _, body = item.partition(":")
        opts: dict = {}
        for kv in [x for x in body.split(",") if x.strip()]:
            k, _, v = kv.partition("=")
            opts[k.strip()] = parse_value(v)
        out.append((name.strip(), opts))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--references", type=int, default=200)
    ap.add_argument("--background", type=int, default=400)
    ap.add_argument("--activate", type=int, default=None, metavar="N",
                    help="activate and measure only the first N references (all are indexed); default: all")
    ap.add_argument("--index", default="IVF32,PQ8x8")
    ap.add_argument("--model", default=None, help="model name or torchscript:PATH (default: raysearch's default model)")
    ap.add_argument("--edits", default=EDITS)
    ap.add_argument("--variants", default="paper:;lr0.3-aug2:lr=0.3,augment=2")
    ap.add_argument("--psnr", type=float, default=40.0, help="PSNR floor of every activated image (dB)")
    ap.add_argument("--workdir", default="bench-out/activate")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.activate is not None and args.activate < 1:
        ap.error(f"--activate must be >= 1, got {args.activate}")

    import ray

    from raysearch.activate.optimize import ActivateConfig
    from raysearch.activate.pipeline import ActivatePipelineConfig, activate_source
    from raysearch.builder import build
    from raysearch.embed import EmbedConfig
    from raysearch.evaluate.activation import ActivationEvalConfig, evaluate_activation
    from raysearch.datasets.copyset import CopySetConfig, write_copy_detection_set
    from raysearch.index.build import IndexConfig
    from raysearch.models.names import DEFAULT_MODEL
    from raysearch.models.spec import ModelConfig

    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    data = os.path.join(work, "data")
    cs = write_copy_detection_set(data, CopySetConfig(n_references=args.references, n_queries=1,
                                                      n_background=args.background, seed=0))
    shutil.rmtree(cs.queries)  # not indexed: only references and background are
    os.remove(cs.ground_truth)
    to_activate = os.path.join(work, "references.csv")
    with open(to_activate, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "id"])
        for rid in cs.reference_ids[: args.activate]:
            w.writerow([os.path.join(cs.references, rid + ".jpg"), f"references/{rid}"])

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    index_dir = os.path.join(work, "index")
    t = time.perf_counter()
    res = build(data, index_dir, EmbedConfig(model=ModelConfig(name=args.model or DEFAULT_MODEL), progress=False),
                IndexConfig(factory=args.index))
    build_s = time.perf_counter() - t
    nprobe = res.manifest["search"].get("nprobe")
    print(f"index {args.index}: {res.manifest['n_vectors']} vectors, nprobe {nprobe}, built in {build_s:.0f} s")

    edits = tuple(e.strip() for e in args.edits.split(",") if e.strip())
    rows = []
    for name, opts in parse_variants(args.variants):
        out = os.path.join(work, f"activated-{name}")
        cfg = ActivatePipelineConfig(activate=ActivateConfig(psnr=args.psnr, **opts), progress=False)
        summary = activate_source(index_dir, to_activate, out, cfg)
        report = evaluate_activation(index_dir, out, ActivationEvalConfig(edits=edits, seed=0, exact=True))
        row = {
            "variant": name, "options": opts, "n_images": report.n_images,
            "passive": report.passive, "activated": report.activated,
            "mean_passive": report.mean_passive, "mean_activated": report.mean_activated, "ratio": report.ratio,
            "psnr": report.mean_psnr, "ssim": report.mean_ssim,
            "activation_images_per_s": summary.images_per_second,
            "cos_before": summary.mean_cos_before, "cos_after": summary.mean_cos_after,
            "exact_passive": report.exact_passive, "exact_activated": report.exact_activated,
            "mean_exact_passive": report.mean_exact_passive, "mean_exact_activated": report.mean_exact_activated,
            "shared_codes": report.shared_codes,
        }
        rows.append(row)
        print(f"\n== {name} {opts}: {summary.n_activated} activated at {summary.images_per_second:.2f} images/s; "
              f"PSNR {report.mean_psnr:.1f} dB, SSIM {report.mean_ssim:.3f}; "
              f"cos(feature, target) {summary.mean_cos_before:.3f} -> {summary.mean_cos_after:.3f}")
        ep, ea = report.exact_passive or {}, report.exact_activated or {}
        print(f"{'edit':<14}{'passive':>9}{'activated':>11}{'exact passive':>15}{'exact activated':>17}")
        for e in edits:
            print(f"{e:<14}{report.passive[e]:>9.3f}{report.activated[e]:>11.3f}{ep[e]:>15.3f}{ea[e]:>17.3f}")
        print(f"{'mean (edited)':<14}{report.mean_passive:>9.3f}{report.mean_activated:>11.3f}"
              f"{report.mean_exact_passive:>15.3f}{report.mean_exact_activated:>17.3f}   ratio {report.ratio:.2f}x")
        print(f"{report.shared_codes} of {report.n_images} references share their index code with another vector")

    doc = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "index": args.index, "model": args.model or DEFAULT_MODEL,
        "n_vectors": res.manifest["n_vectors"], "n_activate": args.activate, "nprobe": nprobe, "psnr_floor": args.psnr, "variants": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    ray.shutdown()


if __name__ == "__main__":
    main()
