"""CachedFrameSource: gather agrees with the store, devices, dtypes and clear errors."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from features.source import CachedFrameSource, FrameSource
from features.store import FeatureStore, FeatureStoreError, FeatureWriter

D = 6
SPLIT_OF = ["train", "val", "train", "test", "train"]


def write(path: Path, num_videos: int = 15, splits: list[str] | None = None) -> Path:
    rng = np.random.default_rng(7)
    with FeatureWriter(path, feature_dim=D, class_names=["a", "b", "c", "d"], backbone="test",
                       gflops_per_frame=0.385, flops_unit="MACs", dtype="float32") as writer:
        for v in range(num_videos):
            split = (splits or SPLIT_OF)[v % len(splits or SPLIT_OF)]
            writer.add(f"v{v}", rng.standard_normal((4 + v % 7, D)), v % 4, split)
    return path


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return write(tmp_path / "f.h5")


def random_queries(source: FrameSource, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    videos = torch.randint(0, source.num_videos, (k,), generator=gen)
    frames = (torch.rand(k, generator=gen) * torch.as_tensor(source.lengths)[videos]).long()
    return videos, frames


@pytest.mark.parametrize("split", ["train", "val", None])
def test_gather_matches_store(path: Path, split: str | None) -> None:
    source = CachedFrameSource(path, split=split, device="cpu")
    with FeatureStore(path, split=split) as store:
        assert source.video_ids == store.video_ids
        assert source.lengths.tolist() == store.lengths.tolist()
        assert source.labels.tolist() == store.labels.tolist()
        assert (source.feature_dim, source.num_classes) == (D, 4)
        assert (source.gflops_per_frame, source.flops_unit) == (0.385, "MACs")
        videos, frames = random_queries(source, 200)
        got = source.gather(videos, frames)
        assert got.shape == (200, D) and got.dtype == torch.float32
        assert got.device == torch.device("cpu")
        expected = np.stack([store.video(int(v))[int(t)] for v, t in zip(videos, frames,
                                                                          strict=True)])
        np.testing.assert_array_equal(got.numpy(), expected)
        # every last frame, batched
        last = torch.as_tensor(source.lengths) - 1
        np.testing.assert_array_equal(
            source.gather(torch.arange(source.num_videos), last).numpy(),
            np.stack([store.video(i)[-1] for i in range(len(store))]))
    source.store.close()


def test_source_from_a_store_view_and_float16_storage(path: Path) -> None:
    with FeatureStore(path) as store:
        view = store.select(split="train", labels=[1, 2])
        source = CachedFrameSource(view, split="ignored-for-stores", device=torch.device("cpu"),
                                   dtype=torch.float16)
        assert source.video_ids == view.video_ids and source.flat.dtype == torch.float16
        videos, frames = random_queries(source, 50, seed=1)
        got = source.gather(videos, frames)
        assert got.dtype == torch.float32
        expected = np.stack([view.video(int(v))[int(t)] for v, t in zip(videos, frames,
                                                                         strict=True)])
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-3, atol=1e-3)
        preloaded = store.select(split="val")
        preloaded.preload()
        np.testing.assert_array_equal(CachedFrameSource(preloaded, device="cpu").flat.numpy(),
                                      preloaded.read_all())


def test_device_argument(path: Path) -> None:
    auto = CachedFrameSource(path, device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert auto.device.type == expected and auto.flat.device.type == expected
    videos, frames = random_queries(auto, 10)
    assert auto.gather(videos.to(auto.device), frames.to(auto.device)).device.type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            CachedFrameSource(path, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gather_on_gpu_matches_cpu(path: Path) -> None:
    cpu = CachedFrameSource(path, device="cpu")
    gpu = CachedFrameSource(path, device="cuda")
    videos, frames = random_queries(cpu, 100)
    got = gpu.gather(videos.cuda(), frames.cuda())
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), cpu.gather(videos, frames), rtol=0, atol=0)


def test_empty_split_is_a_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path / "no_val.h5", splits=["train", "test"])
    with pytest.raises(FeatureStoreError, match=r"no videos in split 'val'.*'train': 8") as info:
        CachedFrameSource(path, split="val", device="cpu")
    assert info.value.field == "splits" and str(path) in str(info.value)


def test_bad_rows_and_empty_videos_are_refused(path: Path) -> None:
    with h5py.File(path, "a") as f:
        f["features"][int(f["offsets"][2]) + 1] = np.nan  # v2 is train
    with pytest.raises(FeatureStoreError, match="frame 1 of video 'v2'"):
        CachedFrameSource(path, split="train", device="cpu")
    CachedFrameSource(path, split="val", device="cpu")  # other splits are unaffected
    with h5py.File(path, "a") as f:  # make v1 (val) empty: v0 takes its rows
        f["offsets"][1] = f["offsets"][2]
    with pytest.raises(FeatureStoreError, match="video 'v1' has no frames"):
        CachedFrameSource(path, split="val", device="cpu")


def test_pickles_by_path_not_by_tensor(tmp_path: Path) -> None:
    import pickle

    path = tmp_path / "long.h5"
    with FeatureWriter(path, feature_dim=D, class_names=["a"], backbone="test") as writer:
        for v in range(4):
            writer.add(f"v{v}", np.full((1000, D), v, dtype=np.float32), 0, "train")
    source = CachedFrameSource(path, split="train", device="cpu", dtype=torch.float16)
    data = pickle.dumps(source)
    assert len(data) < 4000 < source.flat.numel() * 2  # the path, not the features
    copy = pickle.loads(data)
    assert copy.video_ids == source.video_ids and copy.split == "train"
    assert copy.flat.dtype == torch.float16 and copy.device == source.device
    videos, frames = random_queries(source, 30)
    torch.testing.assert_close(copy.gather(videos, frames), source.gather(videos, frames),
                               rtol=0, atol=0)


def test_gather_refuses_frames_outside_their_video(path: Path) -> None:
    """A frame past a video's end would read the next video's rows of the flat tensor."""
    source = CachedFrameSource(path, split="train", device="cpu")
    last = int(source.lengths[0]) - 1
    ok = source.gather(torch.tensor([0, 0]), torch.tensor([0, last]))
    assert ok.shape == (2, source.feature_dim)
    video_id = source.video_ids[0]
    for frames in ([last + 1], [-1]):
        with pytest.raises(IndexError, match=rf"{path.name}.*'train'.*{video_id}"):
            source.gather(torch.tensor([0]), torch.tensor(frames))
    with pytest.raises(IndexError, match=rf"video index {source.num_videos} outside"):
        source.gather(torch.tensor([source.num_videos]), torch.tensor([0]))
    with pytest.raises(IndexError, match="video index -1"):
        source.gather(torch.tensor([-1]), torch.tensor([0]))


def test_column_moments_match_float64_and_are_computed_once(path: Path, monkeypatch) -> None:
    """The split's per-dimension mean and std equal a float64 computation (sample and
    population), come back as copies, and are computed once per ddof for every caller."""
    import features.moments as moments_module
    import features.source as source_module
    from features.moments import column_mean_std

    source = CachedFrameSource(path, split="train", device="cpu")
    x = source.flat.double()
    calls = []
    real = moments_module.column_mean_std

    def counted(flat, **kwargs):
        calls.append(kwargs)
        return real(flat, **kwargs)

    monkeypatch.setattr(source_module, "column_mean_std", counted)
    for ddof in (0, 1):
        mean, std = source.column_moments(ddof=ddof)
        torch.testing.assert_close(mean, x.mean(0).float(), rtol=0, atol=1e-6)
        torch.testing.assert_close(std, x.std(0, correction=ddof).float(), rtol=1e-6, atol=1e-7)
        mean.zero_()  # a copy: the cached statistics stay intact
        again, _ = source.column_moments(ddof=ddof)
        torch.testing.assert_close(again, x.mean(0).float(), rtol=0, atol=1e-6)
    assert calls == [{"ddof": 0}, {"ddof": 1}]
    # a large offset does not cancel the variance away (two passes)
    shifted = torch.randn(5000, 3, dtype=torch.float64) * 0.01 + 1e4
    _, std = column_mean_std(shifted.float(), ddof=1, chunk=512)
    torch.testing.assert_close(std, shifted.float().double().std(0).float(), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match=r"\[N > 1, D\]"):
        column_mean_std(torch.zeros(1, 4), ddof=1)
