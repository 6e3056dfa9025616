"""The training loop end to end on tiny models: run folder, checkpoint contract, resume after SIGKILL,
2-process DDP with the global-batch MPN, and the bad-input paths (NaN, disk full, bad image, wrong
architecture, newer format)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _trainer_helpers import make_image_folder, register_tiny_backbones, tiny_config, tiny_overrides  # noqa: E402

from models.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint  # noqa: E402
from trainer.loop import TrainingError, train  # noqa: E402

register_tiny_backbones()
HELPER = str(ROOT / "tests" / "_trainer_helpers.py")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "f", n_classes=8, per_class=6)


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def _run_helper(record, args, env=None, timeout=240):
    return subprocess.run([sys.executable, HELPER, str(record), *args], cwd=ROOT, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def test_run_folder_and_checkpoint_contract(folder, tmp_path):
    cfg = tiny_config(folder, **{"data.val_fraction": 0.5, "optim.epochs": 2})
    res = train(cfg, str(tmp_path / "run"))
    out = tmp_path / "run"
    for name in ("config.yaml", "env.json", "last.pt", "best.pt", "metrics.jsonl", "final_metrics.json",
                 "plots/loss.png", "plots/recall.png", "train.log"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and "val/recall@1" in records[0] and records[0]["loss_mpn"] > 0
    ckpt = torch.load(out / "best.pt", weights_only=True)  # plain containers only
    assert ckpt["config"]["preprocess"] == cfg.preprocess.to_dict()
    assert ckpt["config"]["data"]["dataset"] == "folder" and ckpt["config"]["data"]["root"] == str(folder)
    for key in ("model_config", "model", "optimizer", "sampler", "rng", "epoch", "step", "metrics",
                "versions"):
        assert key in ckpt, key
    model = model_from_checkpoint(load_checkpoint(str(out / "last.pt")))
    assert model.config.num_classes == 2  # 4 training classes, 2 held out for validation
    final = json.loads((out / "final_metrics.json").read_text())
    assert "recall@1" in final["test"] and "validation split" in final["protocol"]
    assert res.test_metrics["recall@1"] == final["test"]["recall@1"]


def test_mpn_off_ablation_and_paper_protocol_label(folder, tmp_path):
    cfg = tiny_config(folder, **{"model.use_mpn": "false", "data.select_on": "test", "optim.epochs": 1})
    res = train(cfg, str(tmp_path / "run"))
    rec = res.history[0]
    assert rec["loss_mpn"] is None and "test/recall@1" in rec
    assert "paper protocol" in res.protocol and "TEST" in res.protocol
    assert "mpn.input_proj.weight" not in load_checkpoint(res.best_checkpoint)["model"]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(folder, tmp_path):
    args = ["--set", "runtime.deterministic=true", "--set", "runtime.checkpoint_every_steps=1",
            "--set", "optim.epochs=3", "--set", "optim.warmup_epochs=0.5", "--set", "optim.schedule=cosine"]
    args += [a for o in tiny_overrides(folder) if not o.startswith("optim.epochs") for a in ("--set", o)]
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    r = _run_helper(tmp_path / "ref", ["--out", str(ref_out), *args])
    assert r.returncode == 0, r.stderr[-3000:]
    steps_per_epoch = 4  # 4 classes x 6 images, K=3 -> 8 chunks, P=2 -> 4 batches
    proc = subprocess.Popen([sys.executable, HELPER, str(tmp_path / "k"), "--out", str(out), *args], cwd=ROOT,
                            env=_env(IBC_TEST_STEP_SLEEP="0.3"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        last = out / "last.pt"
        if last.is_file():
            try:
                step = load_checkpoint(str(last))["step"]
            except CheckpointError:
                step = 0
            if step >= 6 and step % steps_per_epoch:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at = step
                break
        time.sleep(0.05)
    assert killed_at is not None, "the run ended before it could be killed"
    ck = load_checkpoint(str(out / "last.pt"))
    assert ck["step"] % steps_per_epoch != 0 and ck["step"] < 3 * steps_per_epoch  # mid-epoch, unfinished
    r = _run_helper(tmp_path / "resumed", ["--out", str(out), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stderr
    a = load_checkpoint(str(ref_out / "last.pt"))
    b = load_checkpoint(str(out / "last.pt"))
    assert a["step"] == b["step"] == 3 * steps_per_epoch
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
    assert [r["loss"] for r in a["history"]] == pytest.approx([r["loss"] for r in b["history"]], rel=1e-6)


def test_two_process_ddp_global_batch_mpn_matches_single_process(folder, tmp_path):
    sets = tiny_overrides(folder, **{"model.backbone": "tiny_nobn_test", "model.mpn.dropout": 0,
                                     "sampler.classes_per_batch": 4, "sampler.images_per_class": 3,
                                     "runtime.max_steps": 3, "runtime.mpn_global_batch": "true",
                                     "augment.erasing": 0.5})
    args = [a for o in sets for a in ("--set", o)]
    single = _run_helper(tmp_path / "single", ["--out", str(tmp_path / "single"), *args])
    assert single.returncode == 0, single.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           HELPER, str(tmp_path / "ddp"), "--out", str(tmp_path / "ddp"), *args]
    ddp = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    rec = [json.loads(Path(f"{tmp_path / 'ddp'}.rank{r}.json").read_text()) for r in (0, 1)]
    one = json.loads(Path(f"{tmp_path / 'single'}.rank0.json").read_text())
    assert len(rec[0]["batches"]) == len(rec[1]["batches"]) == 3
    for b0, b1, g in zip(rec[0]["batches"], rec[1]["batches"], one["batches"]):
        assert len(b0) == len(b1) == 6 and sorted(b0 + b1) == sorted(g)  # disjoint halves of the same batch
        labels = {i: i // 6 for i in g}  # 6 images per class, in class order
        assert {labels[i] for i in b0}.isdisjoint({labels[i] for i in b1})
    assert rec[0]["mpn_batch_size"] == rec[1]["mpn_batch_size"] == 12  # the MPN saw the global batch
    assert one["mpn_batch_size"] == 12
    a = load_checkpoint(str(tmp_path / "single" / "last.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "ddp" / "last.pt"))["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(folder, tmp_path, monkeypatch):
    import trainer.loop as loop

    cfg = tiny_config(folder, **{"runtime.checkpoint_every_steps": 1})
    out = tmp_path / "run"
    orig = loop.TrainStep.forward
    calls = {"n": 0}

    def forward(self, images, labels):
        calls["n"] += 1
        losses = orig(self, images, labels)
        if calls["n"] == 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(loop.TrainStep, "forward", forward)
    with pytest.raises(TrainingError, match="loss became nan at epoch 1, step 3"):
        train(cfg, str(out))
    ck = load_checkpoint(str(out / "last.pt"))
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_disk_full_keeps_previous_checkpoint(folder, tmp_path, monkeypatch, caplog):
    import models.checkpoint as mc

    cfg = tiny_config(folder, **{"optim.epochs": 2})
    out = tmp_path / "run"
    real_save = torch.save
    state = {"epoch": 0}

    def flaky_save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("epoch") == 2:  # every save after epoch 2 hits a full disk
            real_save(obj, f, *a, **k)
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(mc.torch, "save", flaky_save)
    with caplog.at_level("ERROR"):
        train(cfg, str(out))
    assert "No space left on device" in caplog.text and "intact" in caplog.text
    ck = load_checkpoint(str(out / "last.pt"))
    assert ck["epoch"] == 1  # the epoch-1 checkpoint survived
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    del state


def test_bad_image_mid_epoch_skip_and_stop(tmp_path, caplog):
    root = make_image_folder(tmp_path / "f", n_classes=8, per_class=6)
    bad = root / "c01" / "3.jpg"
    bad.write_bytes(b"\x89PNG garbage")
    with caplog.at_level("WARNING"):
        res = train(tiny_config(root, **{"optim.epochs": 1}), str(tmp_path / "skip"))
    assert res.epochs == 1 and str(bad) in caplog.text
    with pytest.raises(TrainingError, match="3.jpg"):
        train(tiny_config(root, **{"optim.epochs": 1, "data.on_bad_image": "stop"}), str(tmp_path / "stop"))
    assert (tmp_path / "stop" / "last.pt").is_file()  # the run so far is kept, resumable after a fix


def test_resume_refuses_other_architecture_and_newer_format(folder, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(folder, **{"optim.epochs": 1}), str(out))
    with pytest.raises(CheckpointError, match="embed_dim"):
        train(tiny_config(folder, **{"optim.epochs": 2, "model.embed_dim": 16}), str(out), resume=True)
    ck = torch.load(out / "last.pt", weights_only=True)
    ck["version"] = 99
    torch.save(ck, out / "last.pt")
    with pytest.raises(CheckpointError, match="newer"):
        train(tiny_config(folder, **{"optim.epochs": 2}), str(out), resume=True)


def test_cli_train_eval_only_and_clear_errors(folder, tmp_path):
    out = tmp_path / "cli"
    sets = [a for o in tiny_overrides(folder, **{"optim.epochs": 1}) for a in ("--set", o)]
    r = _run_helper(tmp_path / "c", ["--out", str(out), *sets])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "R@1" in r.stderr and (out / "best.pt").is_file()
    r = _run_helper(tmp_path / "e", ["--eval-only", str(out / "best.pt"), "--out", str(tmp_path / "ev")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "recall@1" in json.loads((tmp_path / "ev" / "final_metrics.json").read_text())["test"]
    r = _run_helper(tmp_path / "m", ["--out", str(tmp_path / "x"), "--data-root", str(tmp_path / "nowhere"),
                                     *sets[:-0 or None]])
    # --data-root comes last in the overrides and wins: a clear one-line error, no traceback
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _run_helper(tmp_path / "u", ["--out", str(tmp_path / "y"), "--set", "optim.lrr=1"])
    assert r.returncode == 2 and "optim.lrr" in r.stderr and "Traceback" not in r.stderr


def test_options_random_split_clip_channels_last_bf16_reload_best(folder, tmp_path, caplog):
    cfg = tiny_config(folder, **{"sampler.classes_per_batch": 2, "sampler.images_per_class": 4,
                                 "sampler.random_split": "true", "optim.grad_clip": 1.0, "optim.epochs": 3,
                                 "optim.reload_best_at": "[2]", "data.val_fraction": 0.5,
                                 "runtime.channels_last": "true", "runtime.amp": "bf16"})
    with caplog.at_level("INFO"):
        res = train(cfg, str(tmp_path / "run"))
    assert res.epochs == 3 and "epoch 3: reloaded the best model" in caplog.text
    assert all(r["loss"] == r["loss"] for r in res.history)  # finite under bf16 autocast
