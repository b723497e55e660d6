"""vimo-env: View while Moving as a multi-agent reinforcement-learning environment."""

from vimo_env.recognizer import Recognizer, RecognizerConfig

__all__ = ["Recognizer", "RecognizerConfig"]
