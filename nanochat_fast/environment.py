"""The hardware and library versions of this process: saved by training in a run's checkpoints, shown
by the report card (which falls back to the machine writing the report when a run saved none)."""

import importlib.metadata
import os
import platform

import torch

LIBRARIES = ("torch", "triton", "numpy")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def _version(library: str) -> str:
    try:  # the installed version, without importing (importing triton takes seconds)
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device, processes: int = 1) -> dict:
    """The hardware and library versions of this process, JSON-able, for the run's checkpoints."""
    hardware = {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "device": str(device), "processes": processes,
                "os": platform.platform()}
    if device.type == "cuda":
        hardware["gpu"] = torch.cuda.get_device_name(device)
    versions = {"python": platform.python_version(), **{library: _version(library) for library in LIBRARIES}}
    return {"hardware": hardware, "versions": versions}
