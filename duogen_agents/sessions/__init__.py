"""Persisted multi-turn sessions.

``Sessions`` (``repository.py``) reads and manages the sessions of one database without loading a
model; ``archive.py`` exports, forks, deletes and garbage-collects; ``Session`` (``driver.py``) binds
one conversation to an ``Agent`` and runs its turns with the database's LangGraph saver (thread id =
session id), so the planner sees every earlier turn with its images, references to earlier images
resolve across turns, and a turn cut short by a crash, Ctrl-C or an error continues with ``resume()``.

>>> agent = Agent.from_preset("tiny")                                  # doctest: +SKIP
>>> s = agent.session("balcony")                                       # doctest: +SKIP
>>> s.send("Plan a small balcony garden", mode="visual-plan")          # doctest: +SKIP
>>> s.send("Redraw step 2 with a blue pot")                            # doctest: +SKIP
"""

from duogen_agents.sessions.driver import Session
from duogen_agents.sessions.repository import UNFINISHED, GcReport, SessionInfo, Sessions, TurnInfo

__all__ = ["UNFINISHED", "GcReport", "Session", "SessionInfo", "Sessions", "TurnInfo"]
