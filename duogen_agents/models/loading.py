"""Shared helpers for loading checkpoints: device/dtype choice, paths, and error translation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from duogen_agents.errors import GenerationError, ModelLoadError


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for, but no CUDA GPU is available; use device = 'cpu'")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def resolve_source(model: str, what: str) -> str:
    """A local folder (must exist) or a hub id (downloaded by the libraries, if online)."""
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{what} path {model} is a file; give the checkpoint folder")
        return str(p)
    if model.startswith(("/", "./", "../", "~")) or os.sep in model.strip("/").split("/", 1)[-1]:
        raise ModelLoadError(f"{what} path not found: {model}")
    return model


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextmanager
def loading(what: str, source: str) -> Iterator[None]:
    """Turn any failure while loading a checkpoint into one ``ModelLoadError`` line."""
    import torch

    try:
        yield
    except ModelLoadError:
        raise
    except torch.OutOfMemoryError as e:
        raise ModelLoadError(f"out of GPU memory while loading the {what} {source}; use a smaller preset") from e
    except Exception as e:  # the libraries raise OSError, ValueError, KeyError, EnvironmentError...
        raise ModelLoadError(f"cannot load the {what} from {source}: {first_line(e)}") from e


@contextmanager
def generating(what: str) -> Iterator[None]:
    """Turn out-of-memory and library failures during a model call into ``GenerationError``."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise GenerationError(
            f"out of GPU memory while running the {what}; lower the resolution or use a smaller preset"
        ) from e
    except (RuntimeError, ValueError, IndexError) as e:
        raise GenerationError(f"the {what} failed: {first_line(e)}") from e


def quiet_libraries() -> None:
    """Silence the libraries' progress bars and advisory warnings: we report progress ourselves."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
