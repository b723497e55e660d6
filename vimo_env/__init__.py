"""vimo-env: View while Moving as a multi-agent reinforcement-learning environment.

Importing the package registers ``VideoLocators-v0`` with Gymnasium.
"""

from vimo_env.core import CoreObs, CoreStep, EpisodeBatch, EpisodeRecord, LocatorCore
from vimo_env.gym_env import VideoLocatorsEnv, VideoLocatorsVectorEnv, register
from vimo_env.parallel_env import VideoLocatorsParallelEnv, env, parallel_env
from vimo_env.recognizer import Recognizer, RecognizerConfig

register()

__all__ = [
    "CoreObs", "CoreStep", "EpisodeBatch", "EpisodeRecord", "LocatorCore", "Recognizer",
    "RecognizerConfig", "VideoLocatorsEnv", "VideoLocatorsParallelEnv", "VideoLocatorsVectorEnv",
    "env", "parallel_env",
]
