"""The baselines as their authors' code computes them: ``method="mmpareto"`` against a port
of the official MMPareto training step (GeWu-Lab/MMPareto_ICML2024, ``code/MMPareto.py``),
and ``method="ogm"`` against a port of the official OGM-GE step (GeWu-Lab/OGM-GE_CVPR2022,
``main.py``), each written here from reading the public code, on a small audio-visual
model with convolutions, BatchNorm and linear layers, on every backend.

The port: one backward per loss (fused, audio, visual), each encoder tensor's gradient
kept per loss (float32, as autograd gives them to the calibrator too; the rule then in
float64); per encoder, the cosine of the fused and the unimodal
gradient over the encoder's concatenated tensors; weights (0.5, 0.5) when it is positive,
else the two-vector min-norm point (the official solver's closed form, whose 0.999/0.001
clamps a conflict never reaches); then the summed loss's backward, and per encoder
tensor ``new = 2 k0 g_mm + 2 k1 g_uni``, ``r = ||summed grad|| / ||new||``, the gradient
``r * new * 1.5`` where ``r > 1``, else ``new * 1.5``. Heads keep the summed gradient.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from torch import nn

import mmgrad
from mmgrad.methods import ogm_scores
from mmgrad.methods._ogm import ge_noise
from mmgrad.tools.verify import rel_err

from conftest import kernel_backends

CLASSES = 4


class AudioVisual(nn.Module):
    """Two convolutional encoders (BatchNorm inside), a fused head and one head per modality.
    The convolution before BatchNorm has no bias, as usual: BatchNorm cancels it, so its
    exact gradient would be 0 and its float32 one rounding noise, which no rule scales
    meaningfully."""

    def __init__(self) -> None:
        super().__init__()

        def encoder(channels: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(channels, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                                 nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))

        self.audio = encoder(1)
        self.visual = encoder(3)
        self.head = nn.Linear(10, CLASSES)
        self.head_audio = nn.Linear(5, CLASSES)
        self.head_visual = nn.Linear(5, CLASSES)

    def forward(self, spec, image):
        fa, fv = self.audio(spec), self.visual(image)
        return self.head(torch.cat([fa, fv], dim=1)), self.head_audio(fa), self.head_visual(fv)

    def losses(self, spec, image, label):
        ce = nn.functional.cross_entropy
        out, out_a, out_v = self(spec, image)
        return [ce(out, label), ce(out_a, label), ce(out_v, label)]


def make_model(conflict: bool, seed: int) -> AudioVisual:
    """With ``conflict``, each unimodal head points against the fused head's part for its
    modality, so the encoder's two gradients disagree (the test checks that they do)."""
    torch.manual_seed(seed)
    model = AudioVisual()
    with torch.no_grad():
        sign = -2.0 if conflict else 1.0
        model.head_audio.weight.copy_(sign * model.head.weight[:, :5])
        model.head_visual.weight.copy_(sign * model.head.weight[:, 5:])
    return model


def batch(gen: torch.Generator, n: int = 6):
    return (torch.randn(n, 1, 7, 9, generator=gen), torch.randn(n, 3, 6, 6, generator=gen),
            torch.randint(0, CLASSES, (n,), generator=gen))


def official_mmpareto_step(model: AudioVisual, data, gamma: float = 1.5):
    """The official step's gradients (float64), each one's scale (the largest sum of its
    terms' magnitudes: a float32 combination is exact to that, backward-stably, and the
    min-norm point cancels its terms by design), and each encoder's cosine.

    The official code takes the summed gradient from one more backward of the summed
    loss; here it is the float64 sum of the three kept gradients, the same quantity
    without that float32 reduction's own rounding (2e-6 of a conv bias here, which
    would otherwise be all a float32 comparison measures)."""
    encoders = {"audio": list(model.audio.parameters()), "visual": list(model.visual.parameters())}
    named = dict(model.named_parameters())
    kept = []  # per loss: every parameter's gradient, float64
    for loss in model.losses(*data):
        model.zero_grad()
        loss.backward(retain_graph=True)
        kept.append({n: torch.zeros_like(p, dtype=torch.float64) if p.grad is None else p.grad.detach().double()
                     for n, p in named.items()})
    grads = {n: kept[0][n] + kept[1][n] + kept[2][n] for n in named}  # what sum(losses).backward() gives
    scale = {n: float((kept[0][n].abs() + kept[1][n].abs() + kept[2][n].abs()).max()) for n in named}
    name_of = {id(p): n for n, p in named.items()}
    cosines = {}
    for unimodal, enc in ((1, "audio"), (2, "visual")):
        names = [name_of[id(p)] for p in encoders[enc]]
        g_mm = torch.cat([kept[0][n].flatten() for n in names])
        g_uni = torch.cat([kept[unimodal][n].flatten() for n in names])
        cosines[enc] = float(nn.functional.cosine_similarity(g_mm, g_uni, dim=0))
        if cosines[enc] > 0:
            k0, k1 = 0.5, 0.5
        else:  # min over c of ||c g_mm + (1 - c) g_uni||: interior when the gradients conflict
            v11, v12, v22 = float(g_mm @ g_mm), float(g_mm @ g_uni), float(g_uni @ g_uni)
            k0 = (v22 - v12) / (v11 + v22 - 2 * v12)
            k1 = 1 - k0
        for n in names:  # the magnitude rule, tensor by tensor; heads keep the summed gradient
            new = 2 * k0 * kept[0][n] + 2 * k1 * kept[unimodal][n]
            ratio = grads[n].norm() / new.norm()
            grads[n] = (ratio * new if ratio > 1 else new) * gamma
            terms = 2 * k0 * kept[0][n].abs() + 2 * k1 * kept[unimodal][n].abs()
            scale[n] = float(terms.max() * max(float(ratio), 1.0) * gamma)
    return grads, scale, cosines


@pytest.mark.parametrize("backend", ["reference", *kernel_backends()])
@pytest.mark.parametrize("conflict", [False, True], ids=["agree", "conflict"])
def test_mmpareto_is_the_official_step(gen, backend, conflict):
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    seen = {"audio": [], "visual": []}
    for draw in range(4):
        model = make_model(conflict, seed + draw)
        port = copy.deepcopy(model)
        data = batch(gen)
        want, scale, cosines = official_mmpareto_step(port, data)
        for name, c in cosines.items():
            seen[name].append(c)
        cal = mmgrad.FusedCalibrator([{"params": model.audio.parameters()}, {"params": model.visual.parameters()}], 3,
                                     method="mmpareto", backend=backend)
        cal.backward(model.losses(*data))
        for name, p in model.named_parameters():
            err = rel_err(p.grad.double(), want[name], scale[name])
            assert err <= 1e-6, f"draw {draw}, {name}: {err:.2e}"
    # each encoder met the branch the case names (a conflicting head makes it likely, not certain)
    assert all(any((c <= 0) == conflict for c in cs) for cs in seen.values()), f"the case tests nothing: {seen}"


def test_the_group_scope_is_not_the_official_step(gen):
    """``scope="group"`` (mmgrad's variant) takes one norm per encoder: on this model it
    differs from the official step by far more than the test's tolerance, so the test
    above would catch the rule applied at the wrong scope."""
    model = make_model(True, 0)
    port = copy.deepcopy(model)
    data = batch(gen)
    want, _, _ = official_mmpareto_step(port, data)
    cal = mmgrad.FusedCalibrator([{"params": model.audio.parameters()}, {"params": model.visual.parameters()}], 3,
                                 method="mmpareto", scope="group")
    cal.backward(model.losses(*data))
    worst = max(rel_err(p.grad.double(), want[n]) for n, p in model.named_parameters())
    assert worst > 1e-2, f"scope='group' is within {worst:.1e} of the official step here"


def test_a_checkpoint_from_before_the_per_tensor_rule_resumes_only_its_own_rule(gen):
    """A state written before ``scope`` existed was computed per group: it loads into
    ``scope="group"``, and a default calibrator refuses it, naming the option."""
    model = make_model(False, 0)

    def groups():  # a fresh copy each: a parameter belongs to one calibrator
        net = copy.deepcopy(model)
        return [{"params": net.audio.parameters()}, {"params": net.visual.parameters()}]

    old = mmgrad.FusedCalibrator([{"params": model.audio.parameters()}, {"params": model.visual.parameters()}], 3,
                                 method="mmpareto", scope="group", lagged=True)
    old.backward(model.losses(*batch(gen)))
    state = old.state_dict()
    del state["options"]["scope"]
    with pytest.raises(ValueError, match=r"state options scope='group' \(this calibrator: 'tensor'\)"):
        mmgrad.FusedCalibrator(groups(), 3, method="mmpareto", lagged=True).load_state_dict(state)
    resumed = mmgrad.FusedCalibrator(groups(), 3, method="mmpareto", scope="group", lagged=True)
    resumed.load_state_dict(state)
    assert torch.equal(resumed._method.prev_alpha, old._method.prev_alpha)


# ---------------------------------------------------------------------------------- OGM-GE
class FusedAudioVisual(AudioVisual):
    """OGM-GE's model: one fused linear head over the concatenated features; each
    modality's logits are its half of that head (``a W_a^T + b / 2``), which score it."""

    def __init__(self) -> None:
        super().__init__()
        del self.head_audio, self.head_visual  # no unimodal heads

    def forward(self, spec, image):
        fa, fv = self.audio(spec), self.visual(image)
        w, b = self.head.weight, self.head.bias
        return self.head(torch.cat([fa, fv], dim=1)), fa @ w[:, :5].T + b / 2, fv @ w[:, 5:].T + b / 2


def official_ogm_ge_step(model: FusedAudioVisual, data, alpha: float, noise: bool, seed: int = 0):
    """The official OGM-GE step's gradients (float64): the fused loss alone is
    backpropagated; the scores are each modality's summed true-class probability; the
    dominant modality's convolution weights (4-D) are scaled by
    ``1 - tanh(alpha * ratio)`` and, with GE, get ``N(0, std(unmodulated grad) + 1e-8)``.
    The standard normal draws are mmgrad's (``ge_noise``, parameter by calibrator index,
    step 1), so that both add the same noise; the official code draws from torch's RNG."""
    spec, image, label = data
    out, out_a, out_v = model(spec, image)
    model.zero_grad()
    nn.functional.cross_entropy(out, label).backward()
    score_a = sum(torch.softmax(out_a, dim=1)[i, label[i]] for i in range(len(label)))
    score_v = sum(torch.softmax(out_v, dim=1)[i, label[i]] for i in range(len(label)))
    ratio_v = float((score_v / score_a).detach())
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        coeff = {"audio": 1.0, "visual": 1 - math.tanh(alpha * max(ratio_v, 0.0))}
    else:
        coeff = {"audio": 1 - math.tanh(alpha * max(ratio_a, 0.0)), "visual": 1.0}
    grads = {n: p.grad.detach().double() for n, p in model.named_parameters()}
    index = {n: i for i, n in enumerate(n for n, _ in model.named_parameters() if n.split(".")[0] in coeff)}
    for name, g in grads.items():
        encoder = name.split(".")[0]
        if encoder in coeff and g.dim() == 4:
            grads[name] = g * coeff[encoder]
            if noise:
                draws = ge_noise(seed, 1, index[name], 0, g.numel(), "cpu").double().reshape(g.shape)
                grads[name] = grads[name] + draws * (g.std() + 1e-8)
    return grads, ratio_v


@pytest.mark.parametrize("backend", ["reference", *kernel_backends()])
@pytest.mark.parametrize("noise", [False, True], ids=["ogm", "ogm-ge"])
def test_ogm_with_scores_is_the_official_step(gen, backend, noise):
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    for draw in range(4):
        torch.manual_seed(seed + draw)
        model = FusedAudioVisual()
        port = copy.deepcopy(model)
        data = batch(gen)
        want, ratio = official_ogm_ge_step(port, data, alpha=0.8, noise=noise, seed=5)
        cal = mmgrad.FusedCalibrator([{"params": model.audio.parameters()}, {"params": model.visual.parameters()}], 1,
                                     method="ogm", alpha=0.8, noise=noise, seed=5, backend=backend)
        out, out_a, out_v = model(data[0], data[1])
        cal.backward([nn.functional.cross_entropy(out, data[2])], scores=ogm_scores([out_a, out_v], data[2]))
        for name, p in model.named_parameters():
            err = rel_err(p.grad.double(), want[name])
            assert err <= 1e-6, f"draw {draw}, {name}: {err:.2e}"


def test_ogm_modulates_and_noises_only_the_convolutions_by_default(gen):
    """The official step leaves every tensor but the encoders' 4-D weights alone;
    ``modulate="all"`` (mmgrad's variant) scales every encoder tensor."""
    torch.manual_seed(0)
    model = FusedAudioVisual()
    data = batch(gen)
    grads = {}
    for modulate in ("conv", "all"):
        net = copy.deepcopy(model)
        cal = mmgrad.FusedCalibrator([{"params": net.audio.parameters()}, {"params": net.visual.parameters()}], 1,
                                     method="ogm", alpha=2.0, noise=False, modulate=modulate)
        out, out_a, out_v = net(data[0], data[1])
        cal.backward([nn.functional.cross_entropy(out, data[2])], scores=ogm_scores([out_a, out_v], data[2]))
        grads[modulate] = {n: p.grad.clone() for n, p in net.named_parameters()}
    plain = copy.deepcopy(model)
    out, _, _ = plain(data[0], data[1])
    nn.functional.cross_entropy(out, data[2]).backward()
    k = cal.diagnostics["ogm_coefficients"]
    assert float(k.min()) < 0.9 and float(k.max()) == 1.0  # one modality is modulated, the other not
    for name, p in plain.named_parameters():
        encoder = name.split(".")[0]
        modulated = encoder in ("audio", "visual") and float(k[["audio", "visual"].index(encoder)]) < 1.0
        assert torch.equal(grads["conv"][name], p.grad) == (not (modulated and p.dim() == 4)), name
        assert torch.equal(grads["all"][name], p.grad) == (not modulated), name


def test_ogm_scores_are_checked_and_named():
    torch.manual_seed(0)
    model = FusedAudioVisual()
    groups = [{"params": model.audio.parameters()}, {"params": model.visual.parameters()}]
    cal = mmgrad.FusedCalibrator(groups, 1, method="ogm")
    out, _, _ = model(torch.randn(2, 1, 7, 9), torch.randn(2, 3, 6, 6))
    loss = out.pow(2).mean()
    with pytest.raises(ValueError, match="scores must hold 2 values"):
        cal.backward([loss], scores=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="ogm with M = 1 needs the views' scores"):
        cal.backward([loss])
    model.zero_grad()
    with pytest.raises(ValueError, match="with M = 1 each parameter group is its own view"):
        mmgrad.FusedCalibrator([{"params": FusedAudioVisual().audio.parameters()}], 1, method="ogm", group_objectives=[1])
    lin = torch.nn.Linear(3, 1)
    with pytest.raises(TypeError, match="scores: method 'mgda' reads no scores"):
        mmgrad.FusedCalibrator(lin.parameters(), 2, method="mgda").backward(
            [lin(torch.randn(4, 3)).mean(), lin(torch.randn(4, 3)).pow(2).mean()], scores=[1.0, 1.0])


def test_ogm_scores_add_up_over_accumulated_micro_batches(gen):
    """The official scores are sums over the batch's samples: two accumulated halves with
    their own scores equal one backward of the whole batch with its scores."""
    torch.manual_seed(0)
    model = FusedAudioVisual()
    twin = copy.deepcopy(model)
    data = batch(gen, n=8)
    halves = [tuple(t[:4] for t in data), tuple(t[4:] for t in data)]
    kw = dict(method="ogm", alpha=1.5, seed=3)
    cal = mmgrad.FusedCalibrator([{"params": model.audio.parameters()}, {"params": model.visual.parameters()}], 1, **kw)
    one = mmgrad.FusedCalibrator([{"params": twin.audio.parameters()}, {"params": twin.visual.parameters()}], 1, **kw)
    model.eval(), twin.eval()  # BatchNorm on running statistics: the halves then see what the whole batch sees
    for k, (spec, image, label) in enumerate(halves):
        out, out_a, out_v = model(spec, image)
        step = cal.accumulate() if k == 0 else contextlib.nullcontext()
        with step:
            cal.backward([nn.functional.cross_entropy(out, label, reduction="sum") / 8],
                         scores=ogm_scores([out_a, out_v], label))
    out, out_a, out_v = twin(data[0], data[1])
    one.backward([nn.functional.cross_entropy(out, data[2])], scores=ogm_scores([out_a, out_v], data[2]))
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-5, name
    with cal.accumulate():
        out, out_a, out_v = model(data[0], data[1])
        cal.backward([nn.functional.cross_entropy(out, data[2])], scores=ogm_scores([out_a, out_v], data[2]))
    with pytest.raises(ValueError, match="scores: give them to every backward"):
        cal.backward([nn.functional.cross_entropy(model(data[0], data[1])[0], data[2])])
