"""Where a trained checkpoint's retrieval quality comes from: evaluation size and which features.

    python bench/probe_checkpoint.py runs/methods/flowers/ibc-s0/best.pt                 # validation split
    python bench/probe_checkpoint.py RUN/best.pt --sizes 224,256,288 --features head,trunk --split val

For each evaluation crop (the resize keeps the weights' resize/crop ratio, 256/224) and each feature
(``head``: the exported L2-normalised embedding; ``trunk``: the backbone's pooled features before
the head, what the zero-shot baseline uses), R@1 and MAP@R on a split of the checkpoint's own data
config. Why: issue 10 asks why fine-tuning stops where it does (resolution, embedding dimension);
these two questions cost one evaluation each, no training. Use the validation split to choose
anything; the test split only to report. Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdk.cpu import cpu_description  # noqa: E402

OUT_DIR = ROOT / "bench" / "out"


def probe(ckpt: str, split: str, sizes: list[int], features: list[str], batch_size: int) -> list[dict]:
    """One row per (size, feature): R@1, MAP@R and the seconds the evaluation took."""

    from sdk.metrics import evaluate
    from trainer.evaluate import embed_items
    from trainer.loop import split_items, load_trained_model

    model, cfg, _ = load_trained_model(ckpt)
    model.eval()
    items, gallery = split_items(cfg.data, split)
    if gallery is not None:
        raise SystemExit(f"{ckpt}: the {split} split is query vs gallery; probe a leave-one-out split")
    base = cfg.preprocess
    embedders = {"head": model.inference_embedder(), "trunk": model.backbone}
    rows = []
    for size in sizes:
        pre = replace(base, crop=size, resize=round(size * base.resize / base.crop))
        for feat in features:
            t0 = time.perf_counter()
            emb, lab = embed_items(embedders[feat], items, pre, batch_size, channels_last=True)
            m = evaluate(emb, lab, ks=(1,), nmi=False)
            rows.append({"crop": size, "resize": pre.resize, "features": feat, "dim": int(emb.shape[1]),
                         "recall@1": m["recall@1"], "map@r": m["map@r"], "seconds": time.perf_counter() - t0})
            print(f"{size:>5} {pre.resize:>7} {feat:>6} {emb.shape[1]:>5} {100 * m['recall@1']:>7.2f} "
                  f"{100 * m['map@r']:>7.2f} {rows[-1]['seconds']:>6.0f}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--split", default="val", choices=["val", "test", "train"])
    p.add_argument("--sizes", default="224,256,288", help="evaluation crops (comma list)")
    p.add_argument("--features", default="head,trunk", help="head, trunk (comma list)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="JSON file (default bench/out/probe_<run>_<split>.json)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    features = [f for f in args.features.split(",") if f]
    unknown = set(features) - {"head", "trunk"}
    if unknown:
        raise SystemExit(f"--features: unknown {', '.join(sorted(unknown))} (head, trunk)")
    print(f"{args.checkpoint}, {args.split} split; {cpu_description()}")
    print(f"{'crop':>5} {'resize':>7} {'feat':>6} {'dim':>5} {'R@1':>7} {'MAP@R':>7} {'s':>6}")
    rows = probe(args.checkpoint, args.split, sizes, features, args.batch_size)
    run = Path(args.checkpoint).resolve().parent.name
    out = Path(args.out) if args.out else OUT_DIR / f"probe_{run}_{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": args.checkpoint, "split": args.split, "cpu": cpu_description(),
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
