"""Checkpoint (de)serialisation with an explicit allow-list: stored data is untrusted input.

LangGraph's default ``JsonPlusSerializer`` imports and calls any ``(module, name, args)`` msgpack
extension it finds in a checkpoint, unless ``LANGGRAPH_STRICT_MSGPACK`` is set; even in strict mode
it silently hands back the raw arguments of a refused type. Whoever can write one row of the
checkpoint tables could then run code in every worker that opens the session. ``CheckpointSerializer``
writes exactly what LangGraph writes, but reads back only the types this project and LangGraph
store (``ALLOWED_TYPES``); anything else raises ``UnsafeCheckpointError`` *before* any module is
imported, and pickle and legacy JSON-constructor payloads are refused outright.

>>> from langgraph.checkpoint.sqlite import SqliteSaver          # doctest: +SKIP
>>> SqliteSaver(conn, serde=CheckpointSerializer())              # what ``Database.saver`` does

``harden(checkpointer)`` gives a checkpointer built elsewhere (``InMemorySaver()``, a saver a caller
passes to ``build_graph``) this serializer in place of LangGraph's permissive default, on a copy that
shares its storage: the caller's saver itself is left as it was.
"""

from __future__ import annotations

from typing import Any

import ormsgpack
from langgraph.checkpoint.serde import jsonplus
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from duogen_agents.errors import UnsafeCheckpointError

# (module, name) of every class a duogen checkpoint holds: LangChain messages in ``messages``, the
# LangGraph control types, and the few standard-library values LangGraph's own bookkeeping uses.
# Graph state is otherwise plain JSON-like data (ImageRef dicts, ids, counters).
ALLOWED_TYPES: frozenset[tuple[str, str]] = frozenset(
    {
        *(
            (f"langchain_core.messages.{mod}", f"{cls}{suffix}")
            for mod, cls in (
                ("human", "HumanMessage"),
                ("ai", "AIMessage"),
                ("system", "SystemMessage"),
                ("tool", "ToolMessage"),
                ("chat", "ChatMessage"),
            )
            for suffix in ("", "Chunk")
        ),
        ("langchain_core.messages.modifier", "RemoveMessage"),
        ("langgraph.types", "Send"),
        ("langgraph.types", "Interrupt"),
        ("langgraph.types", "Command"),
        ("langgraph.types", "Overwrite"),
        ("datetime", "datetime"),
        ("datetime", "date"),
        ("datetime", "time"),
        ("datetime", "timedelta"),
        ("datetime", "timezone"),
        ("uuid", "UUID"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("collections", "deque"),
    }
)
# (module, name, method) calls LangGraph itself emits.
ALLOWED_METHODS: frozenset[tuple[str, str, str]] = frozenset({("datetime", "datetime", "fromisoformat")})

_CONSTRUCTORS = frozenset(
    {
        jsonplus.EXT_CONSTRUCTOR_SINGLE_ARG,
        jsonplus.EXT_CONSTRUCTOR_POS_ARGS,
        jsonplus.EXT_CONSTRUCTOR_KW_ARGS,
        jsonplus.EXT_PYDANTIC_V1,
        jsonplus.EXT_PYDANTIC_V2,
    }
)
_PLAIN = frozenset({jsonplus.EXT_DELTA_SNAPSHOT, jsonplus.EXT_NUMPY_ARRAY})
_OPTIONS = ormsgpack.OPT_NON_STR_KEYS


class CheckpointSerializer(JsonPlusSerializer):
    """LangGraph's serializer, reading back only ``ALLOWED_TYPES``; see the module docstring."""

    def __init__(self) -> None:
        # LangGraph's strict hook (its own safe list narrowed to ours) does the actual rebuilding,
        # after ``_guard`` has checked every extension in the payload.
        super().__init__(pickle_fallback=False, allowed_json_modules=None, allowed_msgpack_modules=list(ALLOWED_TYPES))

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        type_, payload = data
        if type_ in ("null", "bytes", "bytearray"):
            return super().loads_typed(data)
        if type_ != "msgpack":
            # "pickle" runs code by design; "json" is the pre-msgpack format with its own constructors.
            raise UnsafeCheckpointError(f"a checkpoint value is stored as {type_!r}, which duogen never writes")
        _check_payload(payload)
        return super().loads_typed(data)


def _check_payload(payload: bytes) -> None:
    """Walk every msgpack extension of ``payload``; raise on the first type outside the allow-list.
    Nothing is imported or called here."""
    refused: list[str] = []

    def guard(code: int, data: bytes) -> None:
        inner = ormsgpack.unpackb(data, ext_hook=guard, option=_OPTIONS)
        if code in _CONSTRUCTORS:
            key = (inner[0], inner[1]) if isinstance(inner, (list, tuple)) and len(inner) >= 2 else None
            if key not in ALLOWED_TYPES:
                refused.append(_name(key, inner))
                raise _Refused
        elif code == jsonplus.EXT_METHOD_SINGLE_ARG:
            ok = isinstance(inner, (list, tuple)) and len(inner) >= 4
            if not ok or (inner[0], inner[1], inner[3]) not in ALLOWED_METHODS:
                refused.append(_name((inner[0], inner[1]) if ok else None, inner))
                raise _Refused
        elif code not in _PLAIN:
            refused.append(f"msgpack extension {code}")
            raise _Refused
        return None

    try:
        ormsgpack.unpackb(payload, ext_hook=guard, option=_OPTIONS)
    except Exception as e:  # ormsgpack wraps what the hook raised
        if refused:
            raise UnsafeCheckpointError(
                f"a checkpoint holds a value of type {refused[0]}, which duogen never stores; it was refused, "
                "not loaded"
            ) from None
        raise UnsafeCheckpointError(f"a checkpoint value is not valid msgpack ({type(e).__name__})") from None


class _Refused(Exception):
    pass


def _name(key: tuple[Any, Any] | None, inner: Any) -> str:
    if key is None:
        return f"a malformed extension ({str(inner)[:40]!r})"
    return ".".join(str(k)[:60] for k in key)


def harden(checkpointer: Any) -> Any:
    """``checkpointer`` reading through the allow-listing serializer.

    A checkpointer with LangGraph's permissive default serializer is not changed: a shallow copy of it
    with this serializer is returned, sharing its storage (connection, lock, in-memory dicts), so the
    caller's own graphs on the same saver keep reading the types they store, which duogen never does.
    One with a serializer of the caller's own choosing (e.g. an encrypting one) is returned as it is."""
    import copy

    serde = getattr(checkpointer, "serde", None)
    if type(serde) is not JsonPlusSerializer:
        return checkpointer
    hardened = copy.copy(checkpointer)
    hardened.serde = CheckpointSerializer()
    return hardened


__all__: list[str] = ["ALLOWED_METHODS", "ALLOWED_TYPES", "CheckpointSerializer", "harden"]
