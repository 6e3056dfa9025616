"""Training-step cost of each method: ResNet-50 at 224² with a batch of 54 (6 classes × 9); MPN on vs off.

One step = forward (backbone, head, and the method's loss: for IBC ("mpn_on") the classifier,
the MPN and its classifier, for "mpn_off" (``ce``) the classifier alone), backward and a RAdam
update: exactly the trainer's ``TrainStep``. ``--methods`` adds the other methods
(group_loss, divide_conquer, pml, or pml:<loss>). Synthetic images, so
data loading is not measured. The two variants are timed in alternation (on, off, on, off, ...)
so that load from other processes hits both alike; the median step time of each is reported,
with the ratio on ÷ off (target ≤ 1.05) and images/s.

    python bench/bench_train_step.py                       # CPU, ResNet-50 224², batch 54
    python bench/bench_train_step.py --device cuda --amp bf16 --channels-last --steps 30 \
        --methods ibc,ce,group_loss,divide_conquer,pml:multi_similarity,pml:proxy_anchor
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from models import IBCModel  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.distributed import DistInfo  # noqa: E402
from trainer.loop import TrainStep  # noqa: E402
from trainer.methods import MethodContext, get_method  # noqa: E402

NAMES = {"ibc": "mpn_on", "ce": "mpn_off"}  # the names earlier results used


def build(method: str, args, device):
    torch.manual_seed(0)
    name, _, loss = method.partition(":")
    d = {"model": {"backbone": args.backbone, "embed_dim": 512, "num_classes": args.num_classes,
                   "mpn": {"num_layers": args.mpn_layers, "num_heads": args.mpn_heads}},
         "sampler": {"classes_per_batch": args.classes, "images_per_class": args.per_class},
         "method": {"name": name, **({"loss": loss} if loss else {})}}
    cfg = Config.from_dict(d)
    cfg.model.num_classes = args.num_classes
    model = IBCModel(cfg.model).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cls = get_method(name)
    if not cls.uses_classifier:
        model.classifier.requires_grad_(False)
    m = cls(cfg.method, model, MethodContext(cfg, DistInfo(), [], device)).to(device)
    step = TrainStep(model, m)
    params = [p for p in step.parameters() if p.requires_grad]
    opt = torch.optim.RAdam(params, lr=1e-4, weight_decay=1e-6, decoupled_weight_decay=True)
    if args.compile:
        step = torch.compile(step)
    return step, opt


def run_step(step, opt, x, y, amp):
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        loss = step(x, y)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--classes", type=int, default=6, help="P (classes per batch)")
    p.add_argument("--per-class", type=int, default=9, help="K (images per class)")
    p.add_argument("--num-classes", type=int, default=100, help="classifier width (CUB: 100)")
    p.add_argument("--mpn-layers", type=int, default=1)
    p.add_argument("--mpn-heads", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--methods", default="ibc,ce", help="comma list of method names (pml:<loss> for a PML loss)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "train_step.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    b = args.classes * args.per_class
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, args.size, args.size, generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.arange(args.classes).repeat_interleave(args.per_class).to(device)

    variants = {NAMES.get(m, m): build(m, args, device) for m in args.methods.split(",") if m}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.warmup + args.steps):
        for name, (step, opt) in variants.items():
            sync(device)
            t0 = time.perf_counter()
            run_step(step, opt, x, y, amp)
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "backbone": args.backbone, "size": args.size, "batch": b, "P": args.classes, "K": args.per_class,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else (platform.processor() or platform.machine()) + f", {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(), "amp": args.amp, "channels_last": args.channels_last,
        "compile": args.compile, "steps": args.steps,
        "step_s": med, "step_s_all": times,
        "images_per_s": {k: b / v for k, v in med.items()},
        "ratio_on_over_off": med["mpn_on"] / med["mpn_off"] if {"mpn_on", "mpn_off"} <= set(med) else None,
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
    }
    print(f"{args.backbone} {args.size}² batch {b} on {result['device_name']} (amp {args.amp}, channels_last "
          f"{args.channels_last}, compile {args.compile}, {torch.get_num_threads()} threads)")
    for k in med:
        print(f"  {k:24s} step {1000 * med[k]:9.1f} ms   {b / med[k]:8.1f} img/s")
    if result["ratio_on_over_off"] is not None:
        print(f"  ratio on/off {result['ratio_on_over_off']:.3f} (target <= 1.02)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
