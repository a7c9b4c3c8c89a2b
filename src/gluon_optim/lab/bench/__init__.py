"""Optimizer-step, orthogonalisation and training-step benchmarks (the "speed" part of the lab).

Three measurements, each taken in one process so that the ratios compare like with like, one
module each:

* :mod:`.step`: :func:`bench_step` times one ``optimizer.step()`` on the hidden matrices of a
  nanoGPT block stack (:func:`gpt_shapes`) for ``torch.optim.Muon`` (the reference), this
  library's Muon (Jordan and Polar Express coefficients) and Gluon spectral/RMS (Scion's hidden
  update), and the peers of :mod:`.peers`: pytorch-optimizer's ``Muon`` and ``SCION``,
  HeavyBall's ``Muon`` and ``Scion`` (run eagerly: their ``torch.compile`` is switched off for
  the step) and ``torch.optim.AdamW``. Next to the time it reports how close the first step's
  direction is to the exact polar factor (SVD) on Gaussian gradients (``polar_error``) and on
  gradients with a decaying spectrum ``sigma_i = 1/i`` (``polar_error_decay``, the harder, more
  realistic case), and how many bytes of optimizer state each parameter costs.
* :mod:`.scaling`: :func:`bench_scaling` times :func:`~gluon_optim.polar.newton_schulz` and
  :func:`~gluon_optim.polar.polar_svd` on square ``n x n`` Gaussian matrices, and LiMuon's
  randomized SVD against rank; :func:`plot_scaling` draws them.
* :mod:`.train`: :func:`bench_train` times whole training steps (forward, backward, optimizer
  step) of a lab GPT preset for optimizers of the lab registry (:mod:`gluon_optim.lab.optimizers`),
  in tokens per second, with the optimizer step's share of the step.

Run ``python -m gluon_optim.lab.bench --widths 256,384,768 --train --out DIR`` (or
``gluon-optim bench ...``; :mod:`.command`) to write ``bench.json``, ``bench.md`` and
``scaling.png``. Peers that are not installed (HeavyBall, pytorch-optimizer) are skipped and
listed under "Notes" with the reason. Importing this package imports no optional peer.
"""

from gluon_optim.lab.bench.command import build_parser, main
from gluon_optim.lab.bench.scaling import bench_scaling, format_scaling_table, plot_scaling
from gluon_optim.lab.bench.step import bench_step, contenders, format_step_table, gpt_shapes
from gluon_optim.lab.bench.train import TRAIN_OPTIMIZERS, bench_train, format_train_table

__all__ = [
    "TRAIN_OPTIMIZERS",
    "bench_scaling",
    "bench_step",
    "bench_train",
    "build_parser",
    "contenders",
    "format_scaling_table",
    "format_step_table",
    "format_train_table",
    "gpt_shapes",
    "main",
    "plot_scaling",
]
