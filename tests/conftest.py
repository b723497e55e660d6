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


@pytest.fixture(scope="session")
def extract_clips(tmp_path_factory: pytest.TempPathFactory):
    """A folder of 5 small H.264 clips (2-4 s, 64x48, 10 fps) and a broken file, with
    ``manifest.csv`` listing them in the order v0 v1 broken v2 v3 v4 (labels a/b; v4 in val):
    the input of the extraction tests, local and Ray."""
    import numpy as np

    from features.video_writer import write_video

    folder = tmp_path_factory.mktemp("extract_clips")
    (folder / "videos").mkdir()
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for i in range(5):
        frames = rng.integers(0, 256, (10 * (2 + i % 3), 48, 64, 3), dtype=np.uint8)
        write_video(folder / "videos" / f"v{i}.mp4", frames, fps=10, keyframe_interval=10)
        rows.append(f"videos/v{i}.mp4,{'ab'[i % 2]},{'train' if i < 4 else 'val'}")
    (folder / "videos" / "broken.mp4").write_bytes(b"not a video" * 50)
    rows.insert(3, "videos/broken.mp4,a,train")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder
