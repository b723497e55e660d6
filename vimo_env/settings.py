"""The keywords every front-end shares (SPEC section 6), as one validated settings object.

:class:`EnvSettings` is the one place the keywords are listed, documented, defaulted and
checked; the PettingZoo, Gymnasium (single and vector) and TorchRL front-ends all take their
keywords through :meth:`EnvSettings.resolve` and keep the result as ``env.settings``.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # Python 3.10 (typing_extensions comes with torch)
    from typing_extensions import Unpack

from features.validation import require_int
from vimo_env.core import SAMPLERS, LocatorCore, VideoSampler, build_core
from vimo_env.render import check_render_mode

__all__ = ["EnvSettings", "SettingsKeywords", "Unpack"]


@dataclass(frozen=True)
class EnvSettings:
    """What a ViMo environment is built from (SPEC section 6), shared by every front-end.

    Keywords (every front-end takes each of them; these are the only docs of them):

    * ``features`` - a ``vimo-features`` HDF5 path, or a frame source object (used as it is;
      with ``device="auto"`` its device decides the env's).
    * ``recognizer`` - a checkpoint path (``Recognizer.save``), a ``Recognizer``, or ``None``:
      a freshly initialized one seeded by ``seed`` (valid API, meaningless rewards).
    * ``split`` - the split of the HDF5 file to serve; with a source object it must agree with
      the source's own split, or be ``None`` (accept any).
    * ``num_locators`` - N >= 1; the agents are ``locator_0 .. locator_{N-1}``.
    * ``max_moves`` - m >= 1, moves per locator before it stops.
    * ``stride`` - delta >= 1, frames per unit of movement.
    * ``frame_cost`` - lambda, the reward penalty per newly observed frame (finite; the core
      accepts any finite value).
    * ``device`` - ``"auto"`` (a source object's device, else CUDA only for batches of at least
      ``features.device.AUTO_CUDA_MIN_BATCH`` rows), ``"cpu"``, ``"cuda"``, ...
    * ``seed`` - fixes everything random: the video sampler, the action spaces and, with
      ``recognizer=None``, the fresh recognizer's initialization (an integer >= 0, or None).
    * ``render_mode`` - ``None``, ``"ansi"``, ``"rgb_array"`` or ``"human"`` (the batched
      front-ends, Gymnasium's vector env and TorchRL, offer ``"ansi"`` and ``"rgb_array"``).
    * ``sampler`` - how episodes pick videos: ``"random"`` (uniform, seeded by ``seed``) or
      ``"sweep"`` (videos 0, 1, 2, ... in order, wrapping around: evaluation).
    * ``compute_rewards`` - compute ``P_t`` every step; ``False`` skips F_M until an episode
      ends (ViMo's inference, about 4x faster evaluation): rewards then hold only the frame
      cost and ``p_gt`` is NaN.
    * ``locator_credit`` - also compute each locator's difference reward every step (the team
      reward minus the team reward had that locator alone stopped; 0 when it did not observe),
      given as ``locator_credit`` in the infos (TorchRL: ``("locators", "locator_credit")``);
      needs ``compute_rewards=True``.

    Everything is checked here, once, before any data is loaded; sizes are refused unless they
    are integers (``max_moves=2.9`` is not 2). Front-end-only keywords (``num_envs``,
    TorchRL's ``strict_masks`` / ``update_spec_mask``) stay on their front-ends.

    Why front-ends take ``(features=None, recognizer=None, *, settings=None, **keywords)``:
    the keyword list lives here only instead of in four signatures that drift apart, while
    ``gymnasium.make`` / ``make_vec``, PettingZoo, RLlib and BenchMARL keep passing plain
    keywords. ``features`` and ``recognizer`` stay named (and positional) as the ones nearly
    every call gives; the others are typed ``Unpack[SettingsKeywords]`` (PEP 692), so editors
    and type checkers still complete and check them. An unknown keyword raises ``TypeError``
    naming the valid ones; ``settings=`` together with a keyword raises too (which should win
    is ambiguous): combine them with ``dataclasses.replace(settings, max_moves=...)``.
    """

    features: Any = None
    recognizer: Any = None
    split: str | None = "train"
    num_locators: int = 3
    max_moves: int = 4
    stride: int = 3
    frame_cost: float = 0.1
    device: str | torch.device = "auto"
    seed: int | None = None
    render_mode: str | None = None
    sampler: str = "random"
    compute_rewards: bool = True
    locator_credit: bool = False

    def __post_init__(self) -> None:
        # the same checks and messages as LocatorCore / VideoSampler, made before any loading
        normalized: dict[str, Any] = {
            name: require_int(getattr(self, name), name, minimum=1)
            for name in ("num_locators", "max_moves", "stride")}
        if self.seed is not None:
            normalized["seed"] = require_int(self.seed, "seed", minimum=0)
        if not np.isfinite(self.frame_cost):
            raise ValueError(f"frame_cost must be finite, got {self.frame_cost}")
        normalized["frame_cost"] = float(self.frame_cost)
        check_render_mode(self.render_mode)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.locator_credit and not self.compute_rewards:
            raise ValueError("locator_credit needs compute_rewards=True (it is a share of P_t)")
        normalized["compute_rewards"] = bool(self.compute_rewards)
        normalized["locator_credit"] = bool(self.locator_credit)
        for name, value in normalized.items():  # frozen: write the normalized values directly
            object.__setattr__(self, name, value)

    @classmethod
    def keywords(cls) -> tuple[str, ...]:
        """The keyword names, in SPEC order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def resolve(cls, settings: EnvSettings | None, features: Any, recognizer: Any,
                keywords: Mapping[str, Any], *, owner: str = "EnvSettings",
                own: Iterable[str] = ()) -> EnvSettings:
        """A front-end's settings from its ``settings=``, ``features``, ``recognizer`` and
        other keywords.

        ``features`` and ``recognizer`` count as not given when None (their parameter
        defaults); ``keywords`` is everything else the caller gave. Without
        ``settings`` they build one; with it they must be empty. ``owner`` (the front-end's
        name) and ``own`` (its own keywords) only make the error messages precise.
        """
        named = {"features": features, "recognizer": recognizer}
        given = {**{k: v for k, v in named.items() if v is not None}, **keywords}
        valid = cls.keywords()
        unknown = [k for k in given if k not in valid]
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, [*valid, *own], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            extra = f", plus its own {', '.join(own)}" if own else ""
            raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}{hint}; "
                            f"it takes settings= or the EnvSettings keywords "
                            f"{', '.join(valid)}{extra}")
        if settings is None:
            return cls(**given)
        if not isinstance(settings, EnvSettings):
            raise TypeError(f"{owner}(): settings must be an EnvSettings, got "
                            f"{type(settings).__name__}")
        if given:
            names = ", ".join(sorted(given))
            raise TypeError(f"{owner}() got settings= and also {names}: give one or the other "
                            f"(dataclasses.replace(settings, {sorted(given)[0]}=...) combines "
                            "them)")
        return settings

    def build(self, batch_size: int) -> tuple[LocatorCore, VideoSampler]:
        """What every front-end runs on: the batched engine of ``batch_size`` rows these
        settings describe, and the video sampler of its split (``sampler``, ``seed``)."""
        core = build_core(self.features, self.recognizer, split=self.split,
                          num_locators=self.num_locators, max_moves=self.max_moves,
                          stride=self.stride, frame_cost=self.frame_cost, device=self.device,
                          seed=self.seed, compute_rewards=self.compute_rewards,
                          batch_size=batch_size, locator_credit=self.locator_credit)
        return core, VideoSampler(core.source.num_videos, self.sampler, self.seed)


class SettingsKeywords(TypedDict, total=False):
    """:class:`EnvSettings`' keywords but ``features`` and ``recognizer`` (named parameters of
    every front-end), for typing the front-ends' ``**keywords`` (docs: :class:`EnvSettings`;
    a test keeps the two lists equal)."""

    split: str | None
    num_locators: int
    max_moves: int
    stride: int
    frame_cost: float
    device: str | torch.device
    seed: int | None
    render_mode: str | None
    sampler: str
    compute_rewards: bool
    locator_credit: bool
