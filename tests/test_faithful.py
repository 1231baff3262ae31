"""The baselines as their authors' code computes them: ``method="mmpareto"`` against a port
of the official MMPareto training step (GeWu-Lab/MMPareto_ICML2024, ``code/MMPareto.py``),
written here from reading it, on a small audio-visual model with convolutions, BatchNorm
and linear layers, on every backend.

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

import copy

import pytest
import torch
from torch import nn

import mmgrad
from mmgrad.verify import rel_err

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
