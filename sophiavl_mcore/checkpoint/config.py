"""The ``checkpoint`` config section: where training checkpoints go, how often, how many
are kept, and what a resume does with a damaged one (see :mod:`.training`)."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass
class CheckpointConfig:
    """The ``checkpoint`` section (the one source of its defaults).

    Attributes:
        dir: checkpoint root; empty disables checkpointing.
        save_interval: save every this many optimizer steps (and always after the last
            step); 0 saves only after the last step.
        keep_last: complete checkpoints kept; older ones are deleted after each save.
        resume: ``auto`` continues from the newest complete checkpoint when one exists,
            ``never`` starts fresh, ``must`` fails when there is none.
        on_corrupt: ``error`` (name the bad file and stop) or ``fallback`` (warn and
            load the previous complete checkpoint).
        checksum: ``sha256`` hashes every file at save and each rank's own files at
            load; ``size`` only compares sizes (faster for very large checkpoints).
    """

    dir: str = ""
    save_interval: int = 0
    keep_last: int = 2
    resume: Literal["auto", "never", "must"] = "auto"
    on_corrupt: Literal["error", "fallback"] = "error"
    checksum: Literal["sha256", "size"] = "sha256"

    def __post_init__(self) -> None:
        errors = []
        if self.save_interval < 0:
            errors.append(f"save_interval={self.save_interval} must be >= 0 (0 = only at the end)")
        if self.keep_last < 1:
            errors.append(f"keep_last={self.keep_last} must be >= 1")
        if self.resume not in ("auto", "never", "must"):
            errors.append(f"resume={self.resume!r} must be one of auto, never, must")
        if self.on_corrupt not in ("error", "fallback"):
            errors.append(f"on_corrupt={self.on_corrupt!r} must be error or fallback")
        if self.checksum not in ("sha256", "size"):
            errors.append(f"checksum={self.checksum!r} must be sha256 or size")
        if errors:
            raise ValueError("checkpoint: " + "; ".join(errors))
