"""The training code people already have: a ``torch.compile``d model, and a PyTorch
Lightning ``LightningModule`` with manual optimization (docs/guide.md, "Training loops you have")."""

from __future__ import annotations

import pytest
import torch

import mmgrad
from mmgrad.training.models import LateFusion
from mmgrad.tools.verify import rel_err

DIMS = {"a": 5, "b": 4, "c": 3}


def _data(n=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = {v: torch.randn(n, d, generator=gen) for v, d in DIMS.items()}
    return x, torch.randint(0, 3, (n,), generator=gen)


def _batches(x, y, size=16):
    for i in range(0, y.numel(), size):
        yield {v: t[i : i + size] for v, t in x.items()}, y[i : i + size]


def _train(losses_of, model, method, data, epochs=2, clip=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cal = mmgrad.FusedCalibrator(model.param_groups(), len(DIMS) + 1, method=method).attach(opt)
    for _ in range(epochs):
        for xb, yb in _batches(*data):
            cal.backward(losses_of(xb, yb))
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), cal


@pytest.mark.parametrize("method", ["bogc", "mgda"])
def test_a_torch_compiled_model_trains_like_eager(method):
    """The M backward passes run through the compiled graph (retain_graph); the reach walk
    sees one compiled backward node, so every loss it computes reaches every encoder in it."""
    data = _data()
    torch.manual_seed(0)
    eager = LateFusion(DIMS, num_classes=3, hidden=8, embed=4)
    compiled = LateFusion(DIMS, num_classes=3, hidden=8, embed=4)
    compiled.load_state_dict(eager.state_dict())
    want, _ = _train(eager.losses, eager, method, data)
    got, cal = _train(torch.compile(compiled.losses), compiled, method, data)
    assert rel_err(got, want) <= 1e-5
    assert cal.step_count == 6


lightning = pytest.importorskip("lightning", reason="lightning is not installed")


class MultiModalModule(lightning.LightningModule):
    """The README's example: manual optimization, ``cal.backward`` instead of ``manual_backward``."""

    def __init__(self, method: str = "bogc", clip=None):
        super().__init__()
        self.automatic_optimization = False
        self.clip = clip
        self.clip_saw_every_gradient = True
        self.model = LateFusion(DIMS, num_classes=3, hidden=8, embed=4)
        self.method = method
        self.calibrator = None

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.calibrator = mmgrad.FusedCalibrator(self.model.param_groups(), len(DIMS) + 1, method=self.method).attach(opt)
        return opt

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = self.model.losses(x, y)
        self.calibrator.backward(losses)  # calibrates: .grad holds the calibrated gradient
        opt = self.optimizers()
        if self.clip is not None:
            self.clip_saw_every_gradient &= all(p.grad is not None for p in self.model.parameters())
            self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad()
        self.log("fused_loss", losses[0].detach())


class _Views(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return self.y.numel()

    def __getitem__(self, i):
        return {v: t[i] for v, t in self.x.items()}, self.y[i]


@pytest.mark.parametrize("clip", [None, 0.05])
def test_a_lightning_module_with_manual_optimization_trains_like_the_plain_loop(tmp_path, clip):
    """With ``self.clip_gradients`` after ``cal.backward``, as Lightning's manual
    optimization places it, the calibrated parameters are clipped as in the plain loop."""
    data = _data()
    torch.manual_seed(0)
    module = MultiModalModule("bogc", clip)
    plain = LateFusion(DIMS, num_classes=3, hidden=8, embed=4)
    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    plain.load_state_dict(start)
    trainer = lightning.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    loader = torch.utils.data.DataLoader(_Views(*data), batch_size=16, shuffle=False)
    trainer.fit(module, loader)
    want, _ = _train(plain.losses, plain, "bogc", data, clip=clip)
    got = torch.cat([p.detach().reshape(-1) for p in module.model.parameters()])
    assert module.calibrator.step_count == 6
    assert module.clip_saw_every_gradient
    assert rel_err(got, want) <= 1e-6
    if clip is not None:  # and the clip bound: unclipped training ends elsewhere
        unclipped = LateFusion(DIMS, num_classes=3, hidden=8, embed=4)
        unclipped.load_state_dict(start)
        free, _ = _train(unclipped.losses, unclipped, "bogc", data)
        assert rel_err(free, want) > 1e-3
