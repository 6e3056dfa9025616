"""``ibc-export``: the command line over :func:`export.api.export_bundle`.

Exit codes: 0 every requested variant passed and was written; 1 bad input or a failed step
(one line on stderr, nothing half-written); 2 usage error; 3 the parity gate rejected a variant
(the passing ones are written, the table and the failure say which and by how much).
"""

from __future__ import annotations

import logging
import sys

import click

from export.errors import GateFailure
from sdk.cli_errors import OneLineCommand, one_line
from sdk.errors import IbcError

log = logging.getLogger("export")

EXIT_ERROR, EXIT_GATE = 1, 3


def _mb(n: int | None) -> str:
    return "-" if not n else f"{n / 1e6:.1f}"


def format_table(result) -> str:
    """Variants as a fixed-width table: size, Recall@K, MAP@R, drop, cosine, pass/fail."""
    ks = result.ks
    head = ["variant", "MB"] + [f"R@{k}" for k in ks] + ["MAP@R", "dR@1", "cos mean", "cos p1", "img/s", "gate"]
    rows = [["pytorch-fp32 (ref)", _mb(result.reference_size)]
            + [f"{100 * result.reference[f'recall@{k}']:.2f}" for k in ks]
            + [f"{100 * result.reference['map@r']:.2f}", "-", "1", "1", "-", "ref"]]
    for v in result.variants:
        p = v.parity
        m = p.metrics or {}
        status = "pass" if p.passed else ("FAIL (kept)" if v.name in result.written else "FAIL")
        rows.append([v.name, _mb(result.sizes.get(v.name))]
                    + [f"{100 * m[f'recall@{k}']:.2f}" if f"recall@{k}" in m else "-" for k in ks]
                    + [f"{100 * m['map@r']:.2f}" if "map@r" in m else "-", f"{p.recall1_drop:+.2f}",
                       f"{p.cosine_mean:.4f}", f"{p.cosine_p1:.4f}",
                       f"{v.images_per_s:.1f}" if v.images_per_s else "-", status])
    for name, why in result.skipped:
        rows.append([name, "-"] + ["-"] * len(ks) + ["-", "-", "-", "-", "-", "skipped"])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]

    def fmt(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)


def _ints(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(int(k) for k in str(value).split(",") if k.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(), help="bundle directory to write (e.g. model.ibc)")
@click.option("--backend", "backends", default="onnx,openvino", help="comma list: onnx, openvino, tensorrt")
@click.option("--precision", "precisions", default="fp32,fp16,int8", help="comma list: fp32, fp16, bf16, int8")
@click.option("--calib-data", type=click.Path(), help="calibration images (default: the checkpoint's training split)")
@click.option("--parity-data", type=click.Path(),
              help="held-out DIR/<class>/<image> for the gate (default: the checkpoint's test split)")
@click.option("--val-data", type=click.Path(),
              help="labelled DIR for OpenVINO int8 accuracy control (default: the checkpoint's validation split)")
@click.option("--data-root", type=click.Path(file_okay=False),
              help="the checkpoint's dataset folder, if it moved (default: config data.root)")
@click.option("--tolerance", default=None,
              help="allowed Recall@1 drop in points: a number (int8) or int8=0.5,fp16=0.1,bf16=0.5,fp32=0.1")
@click.option("--ks", callback=_ints, default=None, help="Recall@K cut-offs, e.g. 1,2,4,8")
@click.option("--allow-drop", is_flag=True, help="write variants that fail the gate too (marked failed)")
@click.option("--overwrite", is_flag=True, help="replace an existing bundle at --out")
@click.option("--calib-size", default=300, type=click.IntRange(1), help="calibration images used")
@click.option("--parity-limit", default=None, type=click.IntRange(2), help="cap the parity set (seeded sample)")
@click.option("--val-limit", default=1000, type=click.IntRange(2), help="cap the accuracy-control validation set")
@click.option("--batch-size", default=32, type=click.IntRange(1))
@click.option("--calib-method", default="minmax",
              type=click.Choice(["minmax", "entropy", "percentile", "distribution"]),
              help="ONNX Runtime int8 calibration method")
@click.option("--ort-scheme", default="auto", type=click.Choice(["auto", "u8s8", "s8s8", "s8s8-symmetric"]),
              help="ONNX Runtime int8 activation/weight types; auto: u8s8 (fastest) where this CPU has exact int8 "
                   "dot products (VNNI, AMX, ARM), s8s8 where u8s8 would saturate (x86 without VNNI)")
@click.option("--ort-keep-float", default="head",
              help="ONNX Runtime int8: comma list of ONNX node names/globs left in float ('head' = embedding head; "
                   "'' = none)")
@click.option("--ort-accuracy-control/--no-ort-accuracy-control", default=True,
              help="ONNX Runtime int8: keep the most sensitive nodes float until the validation Recall@1 drop is "
                   "within --ort-max-drop")
@click.option("--ort-max-drop", default=0.3, type=click.FloatRange(0), help="ONNX Runtime int8 accuracy-control "
              "target, Recall@1 points")
@click.option("--ov-keep-float", default="", help="OpenVINO int8: 'head' and/or regex patterns of nodes left in float")
@click.option("--ov-accuracy-control/--no-ov-accuracy-control", default=True,
              help="OpenVINO int8: revert layers to float until the validation Recall@1 drop is within --ov-max-drop")
@click.option("--ov-max-drop", default=0.3, type=float, help="OpenVINO int8 accuracy-control target, Recall@1 points")
@click.option("--ov-preset", default="performance", type=click.Choice(["performance", "mixed"]))
@click.option("--ov-activation-range", default="minmax",
              type=click.Choice(["minmax", "mean_minmax", "mean_quantile", "histogram"]),
              help="OpenVINO int8: activation ranges from calibration (mean_minmax is NNCF's default)")
@click.option("--ov-fast-bias-correction/--ov-full-bias-correction", default=False,
              help="OpenVINO int8: NNCF's fast bias correction (its default) or the full, slower, more exact one")
@click.option("--ov-int8-float", default="f32", type=click.Choice(["f32", "bf16"]),
              help="precision of the layers an OpenVINO int8 variant leaves in float")
@click.option("--opset", default=18, type=click.IntRange(17))
@click.option("--trt-weak-typing", is_flag=True,
              help="TensorRT 10 only: BuilderFlag FP16/INT8 instead of strong typing")
@click.option("--seed", default=0, type=int)
@click.option("--quiet", "-q", is_flag=True, help="no progress bars, warnings only")
@click.option("--verbose", "-v", is_flag=True, help="debug logging")
def main(checkpoint, out, backends, precisions, calib_data, parity_data, val_data, data_root, tolerance, ks, allow_drop,
         overwrite, calib_size, parity_limit, val_limit, batch_size, calib_method, ort_scheme, ort_keep_float,
         ort_accuracy_control, ort_max_drop, ov_keep_float, ov_accuracy_control, ov_max_drop, ov_preset,
         ov_activation_range, ov_fast_bias_correction, ov_int8_float, opset, trt_weak_typing, seed, quiet, verbose):
    """Export CHECKPOINT to a bundle of ONNX / OpenVINO / TensorRT variants, each gated on Recall@K."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("nncf", "openvino", "onnxruntime", "torch", "onnxscript", "onnx_ir", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.INFO)
    from export.api import export_bundle
    from export.openvino_export import OvInt8Options
    from export.ort_quantize import OrtInt8Options

    def names(spec: str) -> tuple[str, ...]:
        return tuple(s.strip() for s in spec.split(",") if s.strip())

    try:
        result = export_bundle(
            checkpoint, out, backends=backends, precisions=precisions, calib_data=calib_data, parity_data=parity_data,
            val_data=val_data, data_root=data_root, tolerance=tolerance, ks=ks, allow_drop=allow_drop,
            overwrite=overwrite,
            calib_size=calib_size, parity_limit=parity_limit, val_limit=val_limit, batch_size=batch_size,
            ort_int8=OrtInt8Options(scheme=ort_scheme, calibrate_method=calib_method, keep_float=names(ort_keep_float),
                                    accuracy_control=ort_accuracy_control, max_drop=ort_max_drop),
            ov_int8=OvInt8Options(accuracy_control=ov_accuracy_control, max_drop=ov_max_drop, preset=ov_preset,
                                  keep_float=names(ov_keep_float), float_precision=ov_int8_float,
                                  activation_range=ov_activation_range,
                                  fast_bias_correction=ov_fast_bias_correction),
            opset=opset, trt_weak_typing=trt_weak_typing, seed=seed, progress=not quiet)
    except GateFailure as e:
        if e.result is not None:
            click.echo(format_table(e.result))
        click.echo(f"ibc-export: {e}", err=True)
        if e.result is not None and e.result.out:  # the last line: what was shipped despite exit 3
            click.echo(f"the bundle {e.result.out} was written with the passing variants: "
                       f"{', '.join(e.result.written)} (left out: {', '.join(e.result.rejected)})", err=True)
        else:
            click.echo("no variant passed its parity gate: no bundle was written", err=True)
        sys.exit(EXIT_GATE)
    except (IbcError, ValueError, OSError) as e:  # every expected error: checkpoint, data, backend, bundle, disk
        click.echo(f"ibc-export: {one_line(e)}", err=True)
        sys.exit(EXIT_ERROR)
    click.echo(format_table(result))
    click.echo(f"wrote {result.out} ({', '.join(result.written)}) in {result.seconds:.0f}s")


if __name__ == "__main__":  # pragma: no cover
    main()
