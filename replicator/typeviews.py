"""`of` and `views` for a store that serves one record type at a time: the real adapter and
the simulation's fake share them, so both give a type's view the same way."""

from __future__ import annotations

import copy
from typing import Self

from .recordtypes.base import RecordType


class TypeViews:
    rtype: RecordType
    rtypes: tuple[RecordType, ...]

    def _bind(self, rtype: RecordType) -> None:
        """Point this store at `rtype`'s collections (the adapter's own names for them)."""
        raise NotImplementedError

    def of(self, rtype: RecordType) -> Self:
        """This store for `rtype`'s documents, ledger and dead letters; everything else (users,
        sessions, positions, erasures, the fence) is the same objects."""
        if rtype is self.rtype:
            return self
        view = copy.copy(self)
        view._bind(rtype)
        return view

    @property
    def views(self) -> list[Self]:
        """One view per record type mirrored (this one first)."""
        return [self.of(t) for t in self.rtypes]

    collection: str

    async def docs_exist(self) -> bool:
        """This type's collection exists (the adapter asks its server)."""
        raise NotImplementedError

    async def missing_collections(self) -> list[str]:
        """The collections of the types mirrored that do not exist."""
        return [v.collection for v in self.views if not await v.docs_exist()]
