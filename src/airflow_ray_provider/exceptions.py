"""Every exception the provider raises, in one place.

No Airflow or Ray imports: these are raised inside Ray workers too (a checkpoint that fails
its digest, an upstream object that is gone) and travel back pickled, so this module ships
to the cluster with :mod:`airflow_ray_provider.cluster` (see ``cluster/bundle.py``).
"""

from __future__ import annotations


class AirflowRayError(Exception):
    """Base of the provider's own errors."""


# -- connections and clusters ----------------------------------------------------------------
class RayConnectionError(AirflowRayError):
    """The Ray connection is malformed or its cluster cannot be reached."""


class RayVersionMismatch(RayConnectionError):
    """The cluster runs another Ray or Python version than this process; the message names both."""


class GatewayVersionMismatch(RayVersionMismatch):
    """The gateway runs another provider version or API: a new gateway job can replace it (``gateway_bootstrap``)."""


class WatcherUnavailable(RayConnectionError):
    """The triggerer's Ray watcher of a connection could not be started or did not answer in time."""


class WatcherDied(WatcherUnavailable):
    """The watcher exited while a request was pending: the request is sent again to its successor."""


class GatewayError(RayConnectionError):
    """The gateway refused a request or could not be reached; ``status`` is its HTTP status (0: no answer) and the
    message names the gateway, the request and its reason."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class GatewayRequestError(AirflowRayError, ValueError):
    """The gateway refuses a request it could authenticate: ``status`` (400 unless said) is its answer, and the
    message names the field or the object that was wrong."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class LocalClusterError(AirflowRayError, RuntimeError):
    """The embedded Ray head could not be started, found or stopped."""


class RayFeatureUnavailable(AirflowRayError, RuntimeError):
    """A Ray API the provider needs is missing from the installed Ray; the message names the version."""


# -- running tasks -----------------------------------------------------------------------------
class RayTaskFailed(AirflowRayError):
    """The callable raised inside Ray; the message carries the remote traceback."""


class RayTaskCancelled(AirflowRayError):
    """The Ray task was cancelled (timeout, kill, or its Airflow process stopped polling)."""


class RayWaitTimeout(AirflowRayError, TimeoutError):
    """A bounded wait on Ray gave up; the message names what was waited for, where, and for how long."""


class RaySerializationError(AirflowRayError, TypeError):
    """Something a task sends to, or gets from, Ray cannot be pickled."""


# -- results -----------------------------------------------------------------------------------
class RayObjectLost(AirflowRayError, LookupError):
    """A result is gone from Ray: released, or its owner actor, node or cluster restarted."""


class RayXComObjectLost(RayObjectLost):
    """The object an XCom reference points to is gone (and no checkpoint restored it)."""


class UpstreamObjectLost(RayObjectLost):
    """Inside a Ray task: an upstream result is gone from the object store (its node or owner died)."""


class RayXComReferenceError(AirflowRayError, ValueError):
    """A stored XCom reference is malformed or forged; nothing was fetched or unpickled."""


class ResultNotFound(AirflowRayError, LookupError):
    """No run, no XCom and no checkpoint matched; the message names what was looked for."""


class SigningError(AirflowRayError, ValueError):
    """A secret is missing or unusable; the message says where it comes from."""


class GatewayAuthError(AirflowRayError, PermissionError):
    """A request to the gateway, or its answer, is not proven to come from this deployment (forged, altered,
    stale or replayed); nothing of it was read further or unpickled. The message says which check failed."""


# -- checkpoints -------------------------------------------------------------------------------
class CheckpointError(AirflowRayError):
    """A checkpoint could not be written or read; the message names the location."""


class CheckpointNotFound(CheckpointError):
    """No committed checkpoint exists at the location."""


class CheckpointCorrupted(CheckpointError):
    """A checkpoint failed validation or its digest; nothing from it was deserialized."""
