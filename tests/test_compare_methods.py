"""bench/compare_methods.py's bookkeeping without training: the PML screen's pick, the table
(mean ± std, the zero-shot row) and the marked section it rewrites in a results file."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "bench" / "compare_methods.py")
cm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cm)


def _r(entry, seed, r1, baseline=None):
    test = {"recall@1": r1, "recall@2": r1, "recall@4": 1.0, "recall@8": 1.0, "map@r": r1 / 2, "nmi": 0.5}
    return {"dataset": "flowers", "entry": entry, "seed": seed, "test": test, "train_time_s": 120.0,
            "baseline": {"test": baseline} if baseline else None}


def test_screen_pick_table_and_section(tmp_path):
    base = {"recall@1": 0.4, "recall@2": 0.5, "recall@4": 0.6, "recall@8": 0.7, "map@r": 0.1, "nmi": 0.3}
    rows = [_r("ibc", 0, 0.60, base), _r("ibc", 1, 0.62), _r("pml-triplet", 0, 0.50), _r("pml-arcface", 0, 0.55)]
    assert cm.best_pml(rows) == "pml-arcface"
    assert cm.entry_sets("pml-arcface") == ["method.name=pml", "method.loss=arcface"]
    t = cm.table("flowers", rows)
    lines = t.splitlines()
    assert lines[2].startswith("| zero-shot") and "40.00" in lines[2]
    assert lines[3].startswith("| ibc | 0,1 | 61.00 ± 1.41")  # best first, mean ± std over the seeds
    assert lines[4].startswith("| pml-arcface | 0 | 55.00 | 55.00 | 100.00")  # one seed: no spread
    assert lines[3].endswith("| 2.0 |") and "CPU: CPU not recorded" in cm.machine_note(rows)
    # runs from two machines: the minutes say which CPU each row ran on
    rows[3]["cpu"] = "AMD EPYC (family 26 model 2; AVX-512, VNNI; 2 cores)"
    t2 = cm.table("flowers", rows).splitlines()
    assert t2[3].endswith("| 2.0 (B) |") and t2[4].endswith("| 2.0 (A) |")
    assert "(A) AMD EPYC (family 26" in cm.machine_note(rows) and "(B) CPU not recorded" in cm.machine_note(rows)
    md = tmp_path / "R.md"
    md.write_text("# Results\n\nkept\n")
    cm.write_section(md, "flowers", "first")
    cm.write_section(md, "flowers", "second")  # replaced, not appended
    text = md.read_text()
    assert text.count("<!-- compare_methods:flowers -->") == 1 and "second" in text and "first" not in text
    assert text.startswith("# Results\n\nkept")


def test_summaries_from_another_preset_are_left_out(tmp_path, monkeypatch):
    """A summary trained with another preset version or other overrides is neither tabled nor resumed."""
    monkeypatch.setattr(cm, "ROOT", tmp_path)
    monkeypatch.setitem(cm.PRESETS, "flowers", "preset.yaml")
    (tmp_path / "preset.yaml").write_text("optim: {epochs: 4}\n")
    digest = cm.preset_digest("flowers", [])
    path = cm.summary_path(tmp_path / "sum", "flowers", "ibc", 0)
    path.parent.mkdir(parents=True)
    path.write_text(__import__("json").dumps({**_r("ibc", 0, 0.6), "preset_digest": digest}))
    assert cm.read_summary(path, digest)["seed"] == 0
    assert cm.preset_digest("flowers", ["optim.epochs=2"]) != digest
    (tmp_path / "preset.yaml").write_text("optim: {epochs: 5}\n")
    assert cm.read_summary(path, cm.preset_digest("flowers", [])) is None


def test_carry_over_entry_is_the_flowers_preset_on_omniglot():
    """omniglot-lite0 (issue 10's carry-over check) loads as the Flowers Lite0 preset with only the data
    and the budget changed; the other datasets' runs keep their digests (no override added to them)."""
    from trainer.config import load_config

    assert cm.dataset_sets("flowers", ["x=1"]) == ["x=1"]
    sets = cm.dataset_sets("omniglot-lite0", [])
    flowers = load_config(str(ROOT / cm.PRESETS["flowers"]), [])
    carried = load_config(str(ROOT / cm.PRESETS["omniglot-lite0"]), sets)
    assert (carried.data.dataset, carried.optim.epochs) == ("omniglot", 1)
    # the preset's schedule shares are kept: frozen backbone and warm-up as fractions of the run
    assert carried.finetune.freeze_backbone_epochs / 1 == flowers.finetune.freeze_backbone_epochs / flowers.optim.epochs
    assert carried.optim.warmup_epochs / 1 == flowers.optim.warmup_epochs / flowers.optim.epochs
    assert (carried.model, carried.augment, carried.sampler, carried.loss) == (
        flowers.model, flowers.augment, flowers.sampler, flowers.loss)
    assert cm.preset_digest("omniglot-lite0", sets) != cm.preset_digest("flowers", [])
