"""Shared test set-up: one torch thread (small networks run ~10x faster so on 2 cores)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory):
    """Path of a ``tiny`` synthetic ``vimo-features`` file (seed 0), generated once per session.

    120 videos of 30-60 frames, D=16, 6 classes; splits train/val/test 60/20/20%.
    """
    from features.synthetic import generate

    return generate("tiny", tmp_path_factory.mktemp("synthetic") / "tiny.h5", seed=0,
                    progress=False)


@pytest.fixture(scope="session")
def tiny_pair(tiny_dataset, tmp_path_factory: pytest.TempPathFactory):
    """The tiny dataset as the focus file of a glance/focus pair (the peers' input), its glance
    file the synthetic stand-in (built once per session)."""
    from features.pairs import FeaturePair, make_glance_features

    glance = make_glance_features(tiny_dataset, tmp_path_factory.mktemp("pair") / "glance.h5",
                                  seed=0)
    return FeaturePair(glance, tiny_dataset)
