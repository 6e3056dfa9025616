"""Models: the MPN against a loop-written reference of DESIGN §2, gradients, registry, weights."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import models
from models import IBCModel, MessagePassingNetwork, ModelConfig, MPNConfig, softmax_with_zero_logit


def _layer_norm(x, ln):
    mu = sum(x) / len(x)
    var = sum((v - mu) ** 2 for v in x) / len(x)
    return [(v - mu) / math.sqrt(var + ln.eps) * ln.weight[i].item() + ln.bias[i].item() for i, v in enumerate(x)]


def _linear(x, lin):
    w, b = lin.weight.tolist(), lin.bias.tolist() if lin.bias is not None else None
    return [sum(w[o][i] * x[i] for i in range(len(x))) + (b[o] if b else 0.0) for o in range(len(w))]


def reference_mpn(mpn: MessagePassingNetwork, x: torch.Tensor) -> list[list[float]]:
    """DESIGN §2 written with plain Python loops (eval mode: dropout is the identity)."""
    rows = x.double().tolist()
    nodes = [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in rows]  # L2-normalised nodes
    h = [_linear(n, mpn.input_proj) for n in nodes]
    outs = []
    for layer in mpn.layers:
        att = layer.attn
        heads = att.num_heads
        d = len(h[0])
        hd = d // heads
        q = [_linear(n, att.q) for n in h]
        k = [_linear(n, att.k) for n in h]
        v = [_linear(n, att.v) for n in h]
        msg = [[0.0] * d for _ in h]
        for i in range(len(h)):
            for hh in range(heads):
                sl = range(hh * hd, (hh + 1) * hd)
                s = [sum(q[i][c] * k[j][c] for c in sl) / math.sqrt(hd) for j in range(len(h))]
                denom = (1.0 if att.zero_logit else 0.0) + sum(math.exp(t) for t in s)
                a = [math.exp(t) / denom for t in s]
                for j in range(len(h)):  # messages summed over all nodes, self included
                    for c in sl:
                        msg[i][c] += a[j] * v[j][c]
        attn_out = [_linear(m, att.out) for m in msg]
        h = [_layer_norm([a + b for a, b in zip(hi, oi)], layer.norm1) for hi, oi in zip(h, attn_out)]
        lin1, lin2 = layer.ffn[0], layer.ffn[3]
        ffn = [_linear([max(0.0, t) for t in _linear(hi, lin1)], lin2) for hi in h]
        h = [_layer_norm([a + b for a, b in zip(hi, fi)], layer.norm2) for hi, fi in zip(h, ffn)]
        outs.append(h)
    if mpn.cat:
        return [sum((o[i] for o in outs), []) for i in range(len(h))]
    return h


@pytest.mark.parametrize("layers,heads,cat,zero_logit", [(1, 2, False, True), (2, 4, True, True), (1, 1, False, False)])
def test_mpn_matches_loop_reference(layers, heads, cat, zero_logit):
    torch.manual_seed(0)
    mpn = MessagePassingNetwork(dim=16, num_layers=layers, num_heads=heads, cat=cat, zero_logit=zero_logit).double()
    mpn.eval()
    for p in mpn.parameters():  # non-trivial LayerNorm affine and biases
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(5, 16, dtype=torch.float64) * 3
    got = mpn(x)
    want = torch.tensor(reference_mpn(mpn, x), dtype=torch.float64)
    assert got.shape == (5, 16 * (layers if cat else 1))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_softmax_with_zero_logit_is_softmax_with_an_extra_column():
    s = torch.randn(3, 7, 9) * 50  # large values: must stay finite
    got = softmax_with_zero_logit(s)
    want = torch.softmax(torch.cat([s, torch.zeros(3, 7, 1)], dim=-1), dim=-1)[..., :-1]
    torch.testing.assert_close(got, want)
    assert torch.isfinite(got).all()
    moderate = softmax_with_zero_logit(torch.randn(4, 6))
    assert (moderate.sum(-1) < 1).all() and (moderate > 0).all()


def test_mpn_init_follows_design():
    mpn = MessagePassingNetwork(dim=32, num_heads=2)
    att = mpn.layers[0].attn
    for lin in (att.q, att.k, att.v, att.out):
        assert torch.count_nonzero(lin.bias) == 0
        bound = math.sqrt(6 / (32 + 32))  # Xavier-uniform
        assert lin.weight.abs().max() <= bound
    assert mpn.layers[0].ffn[0].out_features == 4 * 32


def test_mpn_rejects_wrong_shapes():
    mpn = MessagePassingNetwork(dim=8, num_heads=2)
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        mpn(torch.randn(4, 9))
    with pytest.raises(ValueError, match="divisible"):
        MessagePassingNetwork(dim=10, num_heads=3)


def test_bnneck_classifier_bias_frozen_and_small_init():
    clf = models.BNNeckClassifier(64, 10)
    assert not clf.bn.bias.requires_grad and torch.count_nonzero(clf.bn.bias) == 0
    assert clf.fc.bias is None
    assert 0.0005 < clf.fc.weight.std().item() < 0.002


def _tiny_model(**kw):
    cfg = ModelConfig(backbone="resnet18", embed_dim=32, num_classes=4, mpn=MPNConfig(num_heads=2), **kw)
    return IBCModel(cfg)


def test_gradients_reach_backbone_through_mpn():
    torch.manual_seed(0)
    model = _tiny_model()
    model.train()
    out = model(torch.randn(8, 3, 32, 32))
    out["mpn_logits"].sum().backward()  # the MPN loss alone
    first_conv = model.backbone.trunk[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert model.classifier.weight.grad is None  # the backbone classifier is not on this path
    assert model.mpn.input_proj.weight.grad.abs().sum() > 0


def test_mpn_output_depends_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    mpn = MessagePassingNetwork(dim=16, num_heads=2).eval()
    x = torch.randn(6, 16)
    a = mpn(x)[0]
    x2 = x.clone()
    x2[3] = torch.randn(16)
    b = mpn(x2)[0]
    assert not torch.allclose(a, b)  # sample 0 is refined from the others


def test_model_outputs_and_ablation():
    model = _tiny_model().eval()
    out = model(torch.randn(4, 3, 32, 32))
    assert out["embedding"].shape == (4, 32) and out["logits"].shape == (4, 4)
    assert out["mpn_features"].shape == (4, 32) and out["mpn_logits"].shape == (4, 4)
    ablation = _tiny_model(use_mpn=False).eval()
    assert "mpn_logits" not in ablation(torch.randn(4, 3, 32, 32))
    assert not any(n.startswith("mpn") for n, _ in ablation.named_parameters())


def test_inference_embedder_is_normalised_backbone_without_mpn():
    model = _tiny_model().eval()
    emb = model.inference_embedder().eval()
    x = torch.randn(3, 3, 32, 32)
    e = emb(x)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(e, F.normalize(model.embed(x), dim=1))
    assert not any("mpn" in n or "classifier" in n for n, _ in emb.named_parameters())


@pytest.mark.parametrize("name", models.list_backbones())
def test_registry_builds_every_backbone(name):
    bb = models.create_backbone(name, pooling="avg")
    out = bb(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, bb.feature_dim)


def test_pooling_modes():
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(models.GlobalPool("max")(x), x.amax(dim=(2, 3)))
    torch.testing.assert_close(models.GlobalPool("avg")(x), x.mean(dim=(2, 3)))
    torch.testing.assert_close(models.GlobalPool("maxavg")(x), x.amax(dim=(2, 3)) + x.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="pooling"):
        models.GlobalPool("gem")
    with pytest.raises(ValueError, match="unknown backbone"):
        models.create_backbone("resnet9000")


def test_pretrained_weights_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(models.PretrainedWeightsNotFound, match="resnet18.*not found.*resnet18-"):
        models.create_backbone("resnet18", pretrained=True)
    with pytest.raises(models.PretrainedWeightsNotFound, match="nope.pth"):
        models.create_backbone("resnet18", pretrained=str(tmp_path / "nope.pth"))


def test_pretrained_weights_load_from_local_file(tmp_path, monkeypatch):
    src = models.create_backbone("resnet18")
    from models._torchvision import tv_models

    net = tv_models.resnet18()
    torch.save(net.state_dict(), tmp_path / "w.pth")
    bb = models.create_backbone("resnet18", pretrained=str(tmp_path / "w.pth"))
    torch.testing.assert_close(bb.trunk[0].weight, net.conv1.weight)
    assert not torch.equal(src.trunk[0].weight, bb.trunk[0].weight)
    # the hub-cache path is found too
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    name = models.get_backbone_spec("resnet18").weights.url.rsplit("/", 1)[1]
    torch.save(net.state_dict(), tmp_path / "hub" / "checkpoints" / name)
    bb2 = models.create_backbone("resnet18", pretrained=True)
    torch.testing.assert_close(bb2.trunk[0].weight, net.conv1.weight)


def test_torchvision_imports_through_the_shim_on_cpu_torch():
    code = "import models._torchvision as s; import torchvision; print(torchvision.__version__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
