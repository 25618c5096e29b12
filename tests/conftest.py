"""Shared test set-up: deterministic, single-threaded per worker, CPU only."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import settings

from nets import CAPTUM_NETS, plain_cnn

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


def _registries() -> list[dict]:
    from betasmooth import attack, defense, metrics, report, zoo
    from betasmooth.explain import CHECKS, INPUT_CHECKS, METHODS, PREFIXES
    from betasmooth.smooth import THROUGH_RELU

    return [
        METHODS,
        PREFIXES,
        CHECKS,
        INPUT_CHECKS,
        metrics.METRICS,
        metrics.REDUCTIONS,
        attack.LOSSES,
        attack.GOALS,
        defense.DEFENSES,
        THROUGH_RELU,
        zoo.BUILTIN_DATA,
        zoo.BUILTIN_MODELS,
        zoo.MODEL_SCHEMES,
        zoo.SCHEME_WEIGHTS,
        report.SECTIONS,
    ]


@pytest.fixture(autouse=True)
def _registries_restored() -> Iterator[None]:
    # A test that registers a method (or a model file it runs does) leaves the
    # registries as it found them: `--method all` of a later test in the same
    # worker would otherwise attack it too.
    saved = [(registry, dict(registry)) for registry in _registries()]
    yield
    for registry, entries in saved:
        registry.clear()
        registry.update(entries)


@pytest.fixture(params=sorted(CAPTUM_NETS))
def net(request) -> torch.nn.Module:
    """Each architecture on which the methods are checked against Captum, in float64."""
    return CAPTUM_NETS[request.param]().double()


@pytest.fixture
def x() -> torch.Tensor:
    """A float64 batch of 4 inputs in [0, 1) for those architectures."""
    return torch.rand(4, 1, 16, 16, dtype=torch.float64)


@pytest.fixture(scope="module")
def small() -> tuple[torch.nn.Module, torch.Tensor]:
    """A small ReLU CNN with 5 classes and a batch of 4 single-channel 16 x 16 inputs."""
    net = plain_cnn(seed=3)
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    return net, x


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in test split."""
    import betasmooth as bs

    return bs.load_data("digits", split="test")


@pytest.fixture(scope="session")
def digits_cnn() -> torch.nn.Module:
    """The built-in trained CNN, in evaluation mode."""
    import betasmooth as bs

    return bs.load_model("digits-cnn")


# Property tests draw the same examples on every run.
settings.register_profile("deterministic", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("deterministic")
