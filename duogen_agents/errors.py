"""The one exception tree of duogen-agents.

::

    DuogenError                 base: every error this package raises on purpose
    ├── ConfigError             bad preset, bad option, bad prompt
    │   ├── PromptTooLongError      a conversation longer than the planner's context
    │   └── SessionExistsError      a new session's id is taken
    ├── InputImageError         an input image that cannot be read or is too large
    ├── ModelLoadError          a checkpoint that is missing or fails to load
    ├── GenerationError         a model call that failed (out of memory included)
    ├── StorageError            the image store, the database or the output folder failed
    │   └── UnsafeCheckpointError   a stored checkpoint holds a type duogen never writes (refused)
    ├── SessionBusyError        another turn (this process or another) is writing the same session
    ├── SessionNotFoundError    no session has that id
    ├── SessionStateError       the session cannot do that now (an unfinished turn, nothing to resume)
    └── TurnStoppedError        a turn stopped between two steps on request (a server shutting down)

Every error carries a one-line message that says what went wrong and how to fix it;
the CLI prints exactly that line, never a traceback.
"""

from __future__ import annotations


class DuogenError(Exception):
    """Base of every error raised on purpose by duogen-agents."""

    code: str = "duogen_error"

    def __str__(self) -> str:
        # Keep the contract of "one line": collapse any newline a wrapped library put in.
        return " ".join(super().__str__().split())


class ConfigError(DuogenError):
    code = "config"


class PromptTooLongError(ConfigError):
    """The conversation does not fit the planner's context (OpenAI's ``context_length_exceeded``)."""

    code = "context_length_exceeded"


class SessionExistsError(ConfigError):
    """A session with that id exists already (a fork's or a new session's id)."""

    code = "session_exists"


class InputImageError(DuogenError):
    code = "input_image"


class ModelLoadError(DuogenError):
    code = "model_load"


class GenerationError(DuogenError):
    code = "generation"


class StorageError(DuogenError):
    code = "storage"


class UnsafeCheckpointError(StorageError):
    """A checkpoint read back from storage holds something outside the allow-list: refused, never loaded."""

    code = "unsafe_checkpoint"


class SessionBusyError(DuogenError):
    code = "session_busy"
    session_id: str | None = None


class SessionNotFoundError(DuogenError):
    code = "session_not_found"
    session_id: str | None = None


class SessionStateError(DuogenError):
    code = "session_state"


class TurnStoppedError(DuogenError):
    """A turn stopped after a finished step because its caller asked (``stop`` set): it is left
    interrupted, its finished steps checkpointed, and ``resume`` continues it."""

    code = "turn_stopped"


__all__ = [
    "ConfigError",
    "DuogenError",
    "GenerationError",
    "InputImageError",
    "ModelLoadError",
    "PromptTooLongError",
    "SessionBusyError",
    "SessionExistsError",
    "SessionNotFoundError",
    "SessionStateError",
    "TurnStoppedError",
    "StorageError",
    "UnsafeCheckpointError",
]
