"""libs/common/db.CountedPool is made the way asyncpg.create_pool makes its pool.

asyncpg takes no pool class, so ``db.create_pool`` calls the ``Pool`` constructor itself
with the keywords ``create_pool`` passes and ``create_pool``'s defaults for the ones Tayori
does not set. This fails when asyncpg moves, so that the construction is checked again
against the new version instead of silently drifting from it."""

from __future__ import annotations

import inspect

import asyncpg
import asyncpg.pool

from libs.common import db

#: what db.create_pool passes for the keywords Tayori leaves at asyncpg's defaults.
DEFAULTED = {
    "max_queries": 50000,
    "max_inactive_connection_lifetime": 300.0,
    "connect": None,
    "setup": None,
    "loop": None,
    "connection_class": asyncpg.Connection,
    "record_class": asyncpg.Record,
}


def test_the_pool_is_made_as_create_pool_makes_it_in_this_asyncpg() -> None:
    assert asyncpg.__version__ == "0.32.0"
    create = inspect.signature(asyncpg.create_pool).parameters
    for name, value in DEFAULTED.items():
        assert create[name].default == value, name
    # create_pool hands every keyword to the Pool constructor, and nothing else happens.
    source = inspect.getsource(asyncpg.pool.create_pool)
    assert "return Pool(" in source
    constructor = inspect.signature(asyncpg.Pool.__init__).parameters
    assert set(DEFAULTED) | {"min_size", "max_size", "init", "reset"} <= set(constructor)
    # acquire() is the one door: asyncpg's own fetch/execute go through it.
    assert inspect.getsource(asyncpg.Pool.fetch).count("self.acquire()") == 1
    assert issubclass(db.CountedPool, asyncpg.Pool)
    assert "acquire" in vars(db.CountedPool)
