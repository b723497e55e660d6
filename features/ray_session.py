"""One way to bring Ray up for the package: Ray extraction, RLlib training and their benchmarks.

``with RaySession(address, num_cpus=...):`` joins the cluster at ``address`` (or
``RAY_ADDRESS``; ``"local"`` means a new local one) or starts a private local cluster, and on
exit shuts down what it started. A local cluster:

* has no dashboard and keeps its session files in a fresh temporary folder on a short path
  (Ray's unix socket names must stay under 107 bytes), removed on exit;
* keeps Ray 2.60's token authentication, with a random token held in this process's
  environment (``RAY_AUTH_TOKEN``, inherited by the raylet and every worker) instead of the
  ``~/.ray/auth_token`` file Ray would otherwise write: nothing goes to the home directory. A
  caller's own ``RAY_AUTH_*`` settings are used as they are. Ray's driver caches the first
  token it reads, so the cache is reset whenever ours is set or removed (two sessions of one
  process, e.g. a test run, each work).

A process already connected to Ray (``ray.is_initialized()``) keeps its session: nothing is
started and nothing is shut down.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from typing import Any

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# Ray's socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must fit in 107 bytes
MAX_TEMP_ROOT = 40
_PROCESS_TOKEN = secrets.token_hex(32)  # the token of the local clusters this process starts


def short_temp_root() -> str:
    """A writable folder for Ray's session files whose socket paths stay within the limit."""
    for candidate in (tempfile.gettempdir(), "/tmp"):
        if len(candidate) <= MAX_TEMP_ROOT and os.access(candidate, os.W_OK):
            return candidate
    raise RuntimeError(f"no writable temporary folder shorter than {MAX_TEMP_ROOT} characters "
                       "for Ray's sockets; set TMPDIR to a short path or pass --address")


def ray_init_kwargs(address: str | None, num_cpus: int | None,
                    environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Arguments of ``ray.init``: connect to ``address`` / ``RAY_ADDRESS`` when given, else
    start a local cluster with ``num_cpus`` logical CPUs (None: the machine's) and no
    dashboard (its ``_temp_dir`` is added by :class:`RaySession`)."""
    env = os.environ if environ is None else environ
    address = address or env.get("RAY_ADDRESS") or None
    if address and address != "local":
        return {"address": address}
    kwargs: dict[str, Any] = {"address": "local", "include_dashboard": False}
    if num_cpus is not None:
        kwargs["num_cpus"] = int(num_cpus)
    return kwargs


def _reload_auth_token() -> None:
    """Make this process's Ray driver read the token now in the environment."""
    try:
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):  # pragma: no cover - other Ray versions
        pass


class RaySession:
    """Ray up inside ``with`` (or between :meth:`start` and :meth:`stop`); see the module.

    ``init_kwargs`` go to ``ray.init`` as they are (e.g. ``runtime_env``, ``log_to_driver``).
    ``temp_dir`` is the local cluster's folder (None when joining one); it stays readable
    after :meth:`stop`, which removes the folder.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None,
                 **init_kwargs: Any) -> None:
        self.kwargs = {**ray_init_kwargs(address, num_cpus), **init_kwargs}
        self.temp_dir: str | None = None
        self.started = False
        self._saved_env: dict[str, str | None] = {}

    @property
    def local(self) -> bool:
        return self.kwargs["address"] == "local"

    def start(self) -> RaySession:
        import ray

        if ray.is_initialized():
            return self  # the caller's Ray (e.g. inside a Ray program): leave it alone
        kwargs = dict(self.kwargs)
        if self.local:
            self.temp_dir = tempfile.mkdtemp(prefix="ray", dir=short_temp_root())
            kwargs["_temp_dir"] = self.temp_dir
            if not any(name in os.environ for name in AUTH_VARS):
                # Ray then sets RAY_AUTH_MODE=token itself: both go again on stop()
                self._saved_env = dict.fromkeys(AUTH_VARS)
                os.environ["RAY_AUTH_TOKEN"] = _PROCESS_TOKEN
                _reload_auth_token()
        try:
            ray.init(**kwargs)
        except BaseException:
            self._cleanup()
            raise
        self.started = True
        return self

    def stop(self) -> None:
        import ray

        if self.started:
            ray.shutdown()
            self.started = False
        self._cleanup()

    def __enter__(self) -> RaySession:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _cleanup(self) -> None:
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if self._saved_env:
            _reload_auth_token()  # forget our token: a later cluster of this process has its own
        self._saved_env = {}
