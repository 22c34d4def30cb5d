"""Configuration of the `mend` edit method (what `Editor("mend", **overrides)` accepts)."""

from __future__ import annotations

from dataclasses import dataclass

POSITIONS = ("loss", "all")


@dataclass(frozen=True)
class MENDConfig:
    """How MEND edits; the editor network's own shape lives in its checkpoint.

    checkpoint: a directory written by `save_checkpoint` (or `factedit train-mend`); None = the
        editor shipped for the default model (`factedit/mend/checkpoints/smollm2-135m`).
    layers / matrices: the blocks and MLP roles ("gate", "in", "out") whose weights are edited;
        they must name exactly the parameters the checkpoint was trained for.
    positions: which token positions feed the editor: "loss" = the positions whose output predicts
        a target token (MEND's masking); "all" = every non-padding position (the exact gradient).
    edit_scale: multiplies every learned step size α (1.0 = as trained).
    pass_size: `edit_batch` runs the base model on at most this many requests at a time, sorted by
        length so little padding is computed (the result does not depend on it); None = one pass.
    """

    checkpoint: str | None = None
    layers: tuple[int, ...] = (-3, -2, -1)
    matrices: tuple[str, ...] = ("gate", "in", "out")
    positions: str = "loss"
    edit_scale: float = 1.0
    pass_size: int | None = None

    def __post_init__(self) -> None:
        if not self.layers or not self.matrices:
            raise ValueError("layers and matrices must not be empty")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.pass_size is not None and self.pass_size < 1:
            raise ValueError("pass_size must be >= 1, or None for one pass")
        if not self.edit_scale > 0:
            raise ValueError("edit_scale must be > 0")
