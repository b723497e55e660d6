"""vimo-env: View while Moving as a multi-agent reinforcement-learning environment.

Importing the package registers ``VideoLocators-v0`` with Gymnasium. ``vimo_env.torchrl_env``
(the TorchRL front-end) is resolved on first use, so importing the package never imports torchrl.
"""

from typing import Any

from vimo_env.core import CoreObs, CoreStep, EpisodeBatch, EpisodeRecord, LocatorCore
from vimo_env.gym_env import VideoLocatorsEnv, VideoLocatorsVectorEnv, register
from vimo_env.parallel_env import VideoLocatorsParallelEnv, env, parallel_env
from vimo_env.recognizer import Recognizer, RecognizerConfig
from vimo_env.settings import EnvSettings

register()

__all__ = [
    "CoreObs", "CoreStep", "EnvSettings", "EpisodeBatch", "EpisodeRecord", "LocatorCore",
    "Recognizer", "RecognizerConfig", "VideoLocatorsEnv", "VideoLocatorsParallelEnv",
    "VideoLocatorsVectorEnv", "env", "parallel_env", "torchrl_env",
]

_LAZY = ("torchrl_env", "VideoLocatorsTorchRLEnv")


def __getattr__(name: str) -> Any:
    """Lazy exports: the TorchRL front-end (:mod:`vimo_env.torchrl_front`; not named
    ``torchrl_env``, which would make the submodule shadow the function) imports torchrl only
    when it is asked for."""
    if name in _LAZY:
        from vimo_env import torchrl_front

        return getattr(torchrl_front, name)
    raise AttributeError(f"module 'vimo_env' has no attribute {name!r}")
