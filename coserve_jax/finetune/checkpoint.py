"""Crash-safe checkpoints of a finetuning job, with ``orbax-checkpoint``.

A checkpoint holds what a job needs to continue exactly where it was after an optimizer step:
the float32 master LoRA weights, the optax state (moments, step count), and as JSON the job's
position (optimizer steps done; the data position follows: ``steps * gradient_accumulation_steps``
sequences) and its loss history.

Crash safety is orbax's: a step is written into a temporary directory and renamed into place
only once complete, and ``latest_step`` only sees finished checkpoints, so a crash during a save
leaves the previous checkpoint the latest (``cleanup_tmp_directories`` removes the debris at the
next start). Saves are synchronous: a LoRA checkpoint is megabytes, and the job's next optimizer
step must not race its own save.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class JobCheckpointer:
    """Checkpoints of one job under ``directory`` (one subdirectory per optimizer step).

    Args:
        directory: created if missing.
        max_to_keep: newest checkpoints kept.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=False, cleanup_tmp_directories=True, create=True
            ),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's optimizer step, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        """Write the checkpoint of optimizer step ``step`` (blocks until it is on disk)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, params_like: Any, opt_state_like: Any) -> tuple[Any, Any, dict]:
        """Read checkpoint ``step`` into arrays shaped like the templates.

        Returns:
            ``(params, opt_state, meta)``.
        Raises:
            FileNotFoundError: no such checkpoint.
        """
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}")
        template = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params_like, "opt_state": opt_state_like})
        out = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore())
        )
        return out.state["params"], out.state["opt_state"], dict(out.meta)

    def close(self) -> None:
        self._manager.close()
