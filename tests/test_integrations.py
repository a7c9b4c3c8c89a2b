"""gluon_optim.integrations against the real frameworks: tiny random-init models, a few steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import gluon_optim as go

transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")
accelerate = pytest.importorskip("accelerate")

from _matrix import tiny_gpt2  # noqa: E402
from gluon_optim.integrations import hf, lightning  # noqa: E402

VOCAB = 37


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    return tiny_gpt2(VOCAB, n_layer=1, n_embd=16, n_positions=8)


class _Tokens(torch.utils.data.Dataset[dict[str, Tensor]]):
    def __init__(self, n: int = 32) -> None:
        self.ids = torch.randint(0, VOCAB, (n, 8), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp: Path, **overrides: Any) -> Any:
    base: dict[str, Any] = dict(
        output_dir=str(tmp),
        use_cpu=True,
        report_to=[],
        max_steps=3,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        seed=0,
        dataloader_num_workers=0,
    )
    return transformers.TrainingArguments(**{**base, **overrides})


# -- unwrap --------------------------------------------------------------------------------------
def test_unwrap_reaches_gluon_through_accelerate_and_lightning() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = go.muon(model, head=model[1])
    assert go.unwrap(opt) is opt
    accelerator = accelerate.Accelerator(cpu=True)
    _, wrapped = accelerator.prepare(model, opt)
    assert not hasattr(wrapped, "previous_iterate")  # what the wrapper hides
    assert go.unwrap(wrapped) is opt
    assert go.unwrap(pl.core.optimizer.LightningOptimizer(wrapped)) is opt
    with pytest.raises(TypeError, match="no gluon_optim.Gluon inside AdamW"):
        go.unwrap(torch.optim.AdamW(model.parameters()))


def test_accelerate_exact_two_point_with_accumulation_equals_a_plain_loop() -> None:
    """accelerate's accumulate() skips step() between syncs; previous_iterate blocks add up."""
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def run(accumulate: bool) -> list[Tensor]:
        model = net()
        opt = go.gluon_mvr(model, variant=1, lr=0.05, head=model[2])
        if accumulate:
            accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
            model, wrapped = accelerator.prepare(model, opt)
        for _ in range(4):
            if accumulate:
                for xs, ys in ((x[:4], y[:4]), (x[4:], y[4:])):
                    with accelerator.accumulate(model):
                        # accelerator.backward divides by the accumulation steps itself.
                        with go.unwrap(wrapped).previous_iterate():
                            accelerator.backward(F.cross_entropy(model(xs), ys))
                        accelerator.backward(F.cross_entropy(model(xs), ys))
                        wrapped.step()
                        wrapped.zero_grad()
            else:
                opt.zero_grad()
                with opt.previous_iterate():
                    F.cross_entropy(model(x), y).backward()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# -- Hugging Face Trainer ------------------------------------------------------------------------
def test_trainer_optimizer_cls_and_kwargs_keeps_the_roles(tmp_path: Path) -> None:
    model = _gpt2()
    cls, kwargs = hf.optimizer_cls_and_kwargs(model, "muon", lr=0.02)
    names = [g["name"] for g in kwargs["params"]]
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_Tokens(),
        optimizer_cls_and_kwargs=(cls, kwargs),
    )
    trainer.train()
    opt = go.unwrap(trainer.optimizer)
    assert [g["name"] for g in opt.param_groups] == names
    assert "hidden_transposed" in names and opt.state  # GPT-2's Conv1D weights, stepped


def test_gluon_trainer_logs_the_lmo_groups_lr(tmp_path: Path) -> None:
    trainer = hf.GluonTrainer(
        model=_gpt2(),
        args=_args(tmp_path),
        train_dataset=_Tokens(),
        preset="muon",
        preset_options={"lr": 0.02, "adamw_lr": 3e-4},
    )
    trainer.train()
    logged = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert logged and all(lr == pytest.approx(0.02) for lr in logged)


def _final(trainer: Any) -> list[Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_gluon_trainer_exact_mvr_with_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    """Two micro-batches of 4 and one batch of 8 give the same steps, previous iterate included
    (if only the last micro-batch were evaluated at X^(k-1), they would not)."""
    runs = []
    for batch, accumulation in ((4, 2), (8, 1)):
        trainer = hf.GluonTrainer(
            model=_gpt2(),
            args=_args(
                tmp_path / str(batch),
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                max_steps=4,
            ),
            train_dataset=_Tokens(),
            preset="gluon_mvr",
            preset_options={"variant": 2, "lr": 0.01},
        )
        assert go.unwrap(trainer.create_optimizer()).needs_closure()
        trainer.train()
        runs.append(_final(trainer))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    start = _gpt2()
    assert any(not torch.equal(a, p) for a, p in zip(runs[0], start.parameters(), strict=True))


def test_gluon_trainer_refuses_clipping_with_exact_steps(tmp_path: Path) -> None:
    trainer = hf.GluonTrainer(
        model=_gpt2(),
        args=_args(tmp_path, max_grad_norm=1.0),
        train_dataset=_Tokens(),
        preset="limuon",
        preset_options={"rank": 2},
    )
    with pytest.raises(ValueError, match="max_grad_norm=1.0 would clip"):
        trainer.create_optimizer()
    model = _gpt2()
    before = [p.detach().clone() for p in model.parameters()]
    given = hf.GluonTrainer(
        model=model,
        args=_args(tmp_path, max_grad_norm=1.0),
        train_dataset=_Tokens(),
        optimizers=(go.gluon_mvr(model), None),
    )
    with pytest.raises(ValueError, match="max_grad_norm=1.0 would clip"):
        given.train()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="preset 'adam' is not one of"):
        hf.GluonTrainer(model=_gpt2(), args=_args(tmp_path), preset="adam")


def test_gluon_trainer_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    def trainer(out: Path, **kw: Any) -> Any:
        return hf.GluonTrainer(
            model=_gpt2(),
            args=_args(out, max_steps=4, save_strategy="steps", save_steps=2, **kw),
            train_dataset=_Tokens(),
            preset="scion",
        )

    whole = trainer(tmp_path / "whole")
    whole.train()
    resumed = trainer(tmp_path / "whole-again")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    for a, b in zip(_final(whole), _final(resumed), strict=True):
        assert torch.equal(a, b)


# -- Lightning ------------------------------------------------------------------------------------
class _Module(pl.LightningModule):  # type: ignore[misc]
    def __init__(self, preset: str, **options: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
        self.preset, self.options = preset, options
        self.calls = 0
        self.logged = 0

    def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.calls += 1
        if not go.unwrap(self.optimizers()).in_previous_iterate:
            self.logged += 1
            self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> go.Gluon:
        factory = getattr(go, self.preset)
        opt: go.Gluon = factory(self.net, head=self.net[2], **self.options)
        return opt

    def configure_callbacks(self) -> list[pl.Callback]:
        return [lightning.GluonCallback()]


def _loader() -> torch.utils.data.DataLoader[tuple[Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    )
    return torch.utils.data.DataLoader(data, batch_size=8)


def _trainer(**kw: Any) -> Any:
    base: dict[str, Any] = dict(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**base, **kw})


# Lightning's own warnings: num_workers advice (UserWarning) and its use of a torch pytree API
# that torch 2.13 deprecates (FutureWarning).
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("preset", go.PRESETS)
def test_lightning_configure_optimizers_with_every_preset(preset: str) -> None:
    module = _Module(preset)
    before = [p.detach().clone() for p in module.parameters()]
    _trainer().fit(module, _loader())
    assert any(not torch.equal(a, p) for a, p in zip(before, module.parameters(), strict=True))
    exact = preset in ("gluon_mvr", "limuon")
    # An exact two-point step runs training_step twice after the first step, and logs once.
    assert module.calls == (1 + 2 * 2 if exact else 3) and module.logged == 3


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"),
        ({"gradient_clip_val": 1.0}, "gradient_clip_val=1.0"),
    ],
)
def test_lightning_callback_refuses_inconsistent_exact_steps(
    setting: dict[str, Any], match: str
) -> None:
    module = _Module("gluon_mvr")
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=match):
        _trainer(**setting).fit(module, _loader())
    assert all(torch.equal(a, p) for a, p in zip(before, module.parameters(), strict=True))
    allowed = _Module("gluon", estimator="mars", two_point="approx")  # one gradient per step
    _trainer(**setting).fit(allowed, _loader())


def test_lightning_callback_refuses_a_gradient_scaler() -> None:
    """The scaler path needs a GPU (Lightning turns 16-mixed into bf16 on CPU), so this drives
    the callback with a stand-in trainer carrying only the attributes it reads."""
    from types import SimpleNamespace

    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    trainer = SimpleNamespace(
        optimizers=[go.gluon_mvr(net, head=net[1])],
        accumulate_grad_batches=1,
        precision="16-mixed",
        precision_plugin=SimpleNamespace(scaler=torch.amp.GradScaler("cpu")),
        gradient_clip_val=None,
    )
    with pytest.raises(ValueError, match="precision='16-mixed' uses a gradient scaler"):
        lightning.GluonCallback().on_fit_start(trainer, None)
    trainer.optimizers = [go.gluon(net, head=net[1], estimator="mars", two_point="approx")]
    lightning.GluonCallback().on_fit_start(trainer, None)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_lightning_lr_monitor_labels_groups_by_role(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    monitor = LearningRateMonitor(logging_interval="step")
    trainer = _trainer(logger=CSVLogger(tmp_path), callbacks=[monitor], log_every_n_steps=1)
    trainer.fit(_Module("muon"), _loader())
    names = {k.split("/")[-1] for k in monitor.lrs}
    assert names == {"hidden", "head", "bias", "norm"}, monitor.lrs.keys()
