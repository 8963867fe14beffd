"""task_device: the device a Ray task runs a trial, a supernet or a re-measurement on."""

from __future__ import annotations


def task_device(device: str) -> str:
    """`device` as configured, "auto" resolved inside a Ray task: "cuda" when Ray gave the task a
    GPU, else "cpu". Call it inside the task (Ray must be initialised there)."""
    if device != "auto":
        return device
    import ray

    return "cuda" if ray.get_gpu_ids() else "cpu"
