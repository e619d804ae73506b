"""The weight-sync interface: the trainer calls ``sync()`` and never sees the transport."""

from __future__ import annotations

import abc
import dataclasses


class WeightSyncError(RuntimeError):
    """A sync that was refused or failed; raised identically on every trainer rank.

    When raised by validation (bad name, shape mismatch, ...) nothing was loaded and
    the engine still serves the previous ``policy_version``.
    """


@dataclasses.dataclass
class SyncReport:
    """What one sync did, as seen by this rank.

    ``bytes_sent`` counts this rank's payload (a rank holding an engine counts what it
    loaded into it); ``bytes_received`` what reached this rank from other ranks;
    ``peak_rss_delta_bytes`` is this process's peak resident memory during the sync
    minus its resident memory right before (sampled every few milliseconds).
    ``debug_max_abs_diff`` is ``None`` unless ``debug_compare`` is on.
    ``engine_update``: how the engine took the weights (``inplace`` / ``reload``).
    """

    policy_version: int
    num_tensors: int
    num_buckets: int
    bytes_loaded: int
    bytes_sent: int
    seconds: float
    peak_rss_delta_bytes: int
    debug_max_abs_diff: float | None = None
    engine_update: str = ""
    bytes_received: int = 0

    @property
    def gb_per_s(self) -> float:
        """Effective rate of HF-format bytes loaded into the engine (GB/s, 1e9 bytes)."""
        return self.bytes_loaded / max(self.seconds, 1e-9) / 1e9


class WeightSync(abc.ABC):
    """Push the trainer's current weights into the rollout engines.

    ``sync`` is collective: every trainer rank calls it; it returns once every engine
    serves the new weights, with the engines' new ``policy_version`` on every rank.
    ``bytes_model``: HF-format bytes of one full sync (the whole policy).
    """

    bytes_model: int = 0

    @abc.abstractmethod
    def sync(self, version: int | None = None) -> SyncReport:
        """Load the current weights; ``version`` sets the engine's counter explicitly
        (default: increment). Raises :class:`WeightSyncError` without touching the
        engine when the weights do not fit it."""

    @property
    @abc.abstractmethod
    def policy_version(self) -> int:
        """The engines' policy version after the last successful sync (every rank)."""
