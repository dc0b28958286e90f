"""The application: users and their moods as production has them, and what the app does to
them (insert, edit, replace, nuke, un-nuke, purge), seeded.

Documents look like production's (DESIGN.md): `_id` an ObjectId, `user` an Auth0 sub, `mood`
any Unicode, `when` a date (BSON keeps milliseconds; the store reads it back tz-aware),
optional `deleted`, optional `atproto: {rkey}` (or `{}`). Users: `{_id: sub, code, atproto:
{did, handle, password}}`, or no `atproto` at all; `@handles`: `{_id: sub, handle}`.

A multi-document write (`updateMany`, `deleteMany`) is not atomic on a real server: each
document is its own oplog entry and other operations interleave. Each mutation is therefore a
generator that yields after every document it writes; the world advances it one document per
step.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId

from replicator.recordtypes.mood import is_deleted

from .fake_mongo import Doc, MongoState
from .fake_pds import REFUSED, PdsState

MOODS, USERS, HANDLES, POSTS = "moods", "users", "@handles", "news-posts"
TEXTS = (
    "feeling fine", "🌧️ rainy but ok", "multi\nline\nmood", "ça va très bien", "日本語のムード",
    "  padded  ", "ok", "tired.", "🎉🎉🎉", "a" * 300, "tabs\tand\u00a0nbsp", "Ω≈ç√∫",
    "🙂" * 1250,
)  # fmt: skip
# What other writers leave in `moods` (docs/bad-input.md): each is reported, never mirrored.
BAD_FIELDS: tuple[dict[str, Any], ...] = (
    {"mood": 42}, {"mood": ""}, {"mood": " \t "}, {"mood": "é" * 2501}, {"mood": None},
    {"when": "2026-03-04T05:06:07.891Z"}, {"when": 1772600767891},
)  # fmt: skip
ODD_FIELDS: tuple[dict[str, Any], ...] = (  # mirrored (or nuked) as the table says
    {"deleted": "yes"}, {"deleted": "false"}, {"deleted": 0}, {"deleted": {}},
    {"deleted": None}, {"atproto": "3kabcdefghij2"}, {"atproto": {"rkey": "not a tid!"}},
)  # fmt: skip
Mutation = Iterator[str]
_NEEDS_MOODS = frozenset(
    {"edit", "replace", "nuke", "unnuke", "purge", "delete_one", "spoil", "mend", "erase"}
)


# How the app (or an operator) erases a user (AC-RECORD-TYPES.md, "Account erasure"): the
# order of the Mongo writes, what happens to the PDS account, and which of the replicator's
# credentials still work by then.
ERASE_ORDERS = ("moods_first", "users_first", "unset_atproto", "users_only")
ACCOUNT_FATES = ("kept", "kept", "deleted_before", "deleted_after")
CREDENTIALS = ("ok", "session_expired", "neither")


@dataclass
class User:
    sub: str
    handle: str
    did: str | None
    password: str | None
    erased: tuple[str, str, str] | None = None  # (order, account fate, credentials)
    # What the operator did for an erasure the replicator could not finish: "deleted" the
    # account, or "restored" the credentials in `users` (then "re-erased" the user).
    rescued: str | None = None
    restored_at: int = 0  # the oplog position of the restore


class App:
    def __init__(
        self,
        mongo: MongoState,
        pds: PdsState,
        rng: random.Random,
        *,
        bad_docs: bool = False,
        deactivations: bool = False,
        erasures: bool = False,
        news_rng: random.Random | None = None,
    ) -> None:
        """`news_rng`: news posts are written too, drawn from it (so that a world without
        news makes exactly the draws it made before there were news)."""
        self.mongo = mongo
        self.pds = pds
        self.rng = rng
        self.news_rng = news_rng
        self.theirs: dict[ObjectId, Doc] = {}  # the `atproto` of each post not ours
        self.bad_docs = bad_docs
        self.deactivations = deactivations
        self.erasures = erasures
        self.users: list[User] = []
        self._odd_ids = 0

    # -- identities --------------------------------------------------------------------------

    def _hex(self, n: int) -> str:
        return f"{self.rng.getrandbits(n * 4):0{n}x}"

    def object_id(self) -> ObjectId:
        """Deterministic: the simulated clock's second and 8 bytes from the RNG."""
        seconds = int(self.mongo.clock.time())
        return ObjectId(seconds.to_bytes(4, "big") + self.rng.getrandbits(64).to_bytes(8, "big"))

    def when(self) -> datetime:
        ms = int(self.mongo.clock.time() * 1000)
        return datetime.fromtimestamp(ms / 1000, UTC)

    def add_user(self, *, with_account: bool) -> User:
        n = len(self.users)
        sub = f"auth0|{self._hex(24)}"
        user = User(sub, f"user{n}.sim.test", None, None)
        doc: Doc = {"_id": sub, "code": self._hex(8)}
        self.users.append(user)
        self.mongo.insert(USERS, doc)
        self.mongo.insert(HANDLES, {"_id": sub, "handle": f"user{n}"})
        if with_account:
            self._give_account(user)
        return user

    def _give_account(self, user: User) -> None:
        alphabet = "abcdefghijklmnopqrstuvwxyz234567"
        user.did = "did:plc:" + "".join(self.rng.choice(alphabet) for _ in range(24))
        user.password = f"pw-{self._hex(16)}"
        self.pds.create_account(user.did, user.handle, user.password)
        atproto = {"did": user.did, "handle": user.handle, "password": user.password}
        self.mongo.update(USERS, user.sub, lambda d: d.__setitem__("atproto", atproto))

    # -- reading -----------------------------------------------------------------------------

    def moods_of(self, user: User) -> list[Doc]:
        return self.mongo.find(MOODS, lambda d: d.get("user") == user.sub)

    def all_moods(self) -> list[Doc]:
        return self.mongo.find(MOODS)

    # -- mutations ---------------------------------------------------------------------------

    def erased_subs(self) -> set[str]:
        return {u.sub for u in self.users if u.erased is not None}

    def dids(self) -> dict[str, str]:
        """Every DID a user ever had → their sub."""
        return {u.did: u.sub for u in self.users if u.did is not None}

    def current(self) -> list[User]:
        """The users the app still has (not erased)."""
        return [u for u in self.users if u.erased is None]

    def pick(self) -> Mutation:
        """A mutation, weighted as a busy app would do them."""
        if self.news_rng is not None and self.news_rng.random() < 0.35:
            return self.pick_news(self.news_rng)
        rng = self.rng
        owners = {m.get("user") for m in self.all_moods()}
        with_moods = [u for u in self.current() if u.sub in owners]
        kinds: list[tuple[str, float]] = [("insert", 10.0), ("insert_odd", 1.0)]
        if with_moods:
            kinds += [("edit", 3.0), ("replace", 2.0), ("nuke", 1.5), ("unnuke", 1.5)]
            kinds += [("purge", 0.7), ("delete_one", 0.7), ("spoil", 0.7), ("mend", 0.7)]
        if self.bad_docs:
            kinds.append(("insert_bad", 1.0))
        if any(u.did is None for u in self.current()):
            kinds.append(("give_account", 0.3))
        if self.deactivations:
            kinds += [("deactivate", 0.4), ("reactivate", 0.6)]
        if self.erasures and with_moods and len(self.current()) > 1:
            kinds.append(("erase", 0.6))
        names, weights = zip(*kinds, strict=True)
        kind = rng.choices(names, weights)[0]
        if kind == "erase" and rng.random() < 0.7:  # mostly someone with records to delete
            with_moods = [u for u in with_moods if self._mirrored(u)] or with_moods
        user = rng.choice(with_moods if kind in _NEEDS_MOODS else self.current())
        mutation: Mutation = getattr(self, kind)(user)
        return mutation

    def _mirrored(self, user: User) -> bool:
        """Some mood of theirs has its rkey written back: a record of theirs exists."""
        return any(isinstance(d.get("atproto"), dict) and d["atproto"].get("rkey")
                   for d in self.moods_of(user))  # fmt: skip

    def text(self) -> str:
        return self.rng.choice(TEXTS) if self.rng.random() > 0.05 or not self.bad_docs else (
            f"{REFUSED} not allowed here"
        )  # fmt: skip

    def insert(self, user: User) -> Mutation:
        doc: Doc = {"_id": self.object_id(), "user": user.sub,
                    "mood": self.text(), "when": self.when()}  # fmt: skip
        self.mongo.insert(MOODS, doc)
        yield f"insert {doc['_id']} of {user.handle}"

    def insert_odd(self, user: User) -> Mutation:
        """A document the app would not write but that is mirrored (or nuked) all the same."""
        doc: Doc = {"_id": self.object_id(), "user": user.sub, "mood": self.text(),
                    "when": self.when(), **self.rng.choice(ODD_FIELDS)}  # fmt: skip
        self.mongo.insert(MOODS, doc)
        yield f"insert odd {doc['_id']} {doc.get('deleted', doc.get('atproto'))!r}"

    def insert_bad(self, user: User) -> Mutation:
        """A document another writer left: invalid fields, no `user`, a string `_id`."""
        doc: Doc = {"_id": self.object_id(), "user": user.sub, "mood": self.text(),
                    "when": self.when()}  # fmt: skip
        kind = self.rng.randrange(3)
        if kind == 0:
            doc.update(self.rng.choice(BAD_FIELDS))
        elif kind == 1:
            del doc["user"]
        else:
            self._odd_ids += 1
            doc["_id"] = f"mood-{self._odd_ids}"
        self.mongo.insert(MOODS, doc)
        yield f"insert bad {doc['_id']!r}"

    def spoil(self, user: User) -> Mutation:
        """A valid document edited into an invalid one: the PDS keeps its last good record."""
        doc = self._some(user)
        fields = self.rng.choice(BAD_FIELDS) if self.bad_docs else {"deleted": "yes"}
        self.mongo.update(MOODS, doc["_id"], lambda d: d.update(fields))
        yield f"spoil {doc['_id']} {fields!r}"

    def mend(self, user: User) -> Mutation:
        """An invalid or odd document fixed with the app's own shapes."""
        doc = self._some(user)
        good = {"mood": self.rng.choice(TEXTS), "when": self.when()}
        self.mongo.update(MOODS, doc["_id"], lambda d: d.update(good))
        yield f"mend {doc['_id']}"

    def _some(self, user: User) -> Doc:
        return self.rng.choice(self.moods_of(user))

    def edit(self, user: User) -> Mutation:
        doc = self._some(user)
        text = self.text() + self.rng.choice(("", "!", " (edited)"))
        self.mongo.update(MOODS, doc["_id"], lambda d: d.__setitem__("mood", text))
        yield f"edit {doc['_id']}"

    def replace(self, user: User) -> Mutation:
        """The whole document, as an admin tool or a migration would write it; sometimes
        without `atproto.rkey` (the replicator must keep the permalink)."""
        doc = self._some(user)
        new: Doc = {"user": user.sub, "mood": self.text(), "when": doc.get("when", self.when())}
        if "deleted" in doc and self.rng.random() < 0.5:
            new["deleted"] = doc["deleted"]
        keep = self.rng.random()
        if "atproto" in doc and keep < 0.5:
            new["atproto"] = doc["atproto"]
        elif keep < 0.75:
            new["atproto"] = {}
        self.mongo.replace(MOODS, doc["_id"], new)
        yield f"replace {doc['_id']} ({'atproto' in new and bool(new['atproto'])})"

    def nuke(self, user: User) -> Mutation:
        """`updateMany({user}, {$set: {deleted: true}})`, one document at a time."""
        for doc in self.moods_of(user):
            if self.mongo.update(MOODS, doc["_id"], lambda d: d.__setitem__("deleted", True)):
                yield f"nuke {doc['_id']}"

    def unnuke(self, user: User) -> Mutation:
        for doc in self.moods_of(user):
            if self.mongo.update(MOODS, doc["_id"], lambda d: d.__setitem__("deleted", False)):
                yield f"unnuke {doc['_id']}"

    def purge(self, user: User) -> Mutation:
        """`deleteMany({user})`: the account purge."""
        for doc in self.moods_of(user):
            if self.mongo.delete(MOODS, doc["_id"]):
                yield f"purge {doc['_id']}"

    def delete_one(self, user: User) -> Mutation:
        doc = self._some(user)
        self.mongo.delete(MOODS, doc["_id"])
        yield f"delete {doc['_id']}"

    def give_account(self, user: User) -> Mutation:
        """A user without an account gets one (`$set atproto` on the users document)."""
        target = next((u for u in self.current() if u.did is None), None)
        if target is not None:
            self._give_account(target)
            yield f"account for {target.handle}"

    def erase(self, user: User) -> Mutation:
        """The user leaves: their moods deleted and their users document deleted or its
        `atproto` unset, in one of the app's orders; their PDS account deleted by the admin
        before, after or never; their credentials still working, or only the password, or
        nothing the replicator kept (the password changed, every session gone)."""
        rng, did = self.rng, user.did
        order, fate, creds = (rng.choice(ERASE_ORDERS), rng.choice(ACCOUNT_FATES),
                              rng.choice(CREDENTIALS))  # fmt: skip
        if did is None and order == "unset_atproto":
            order = "moods_first"  # no `atproto` to unset: the older endpoint changes nothing
        user.erased = (order, fate, creds)
        yield f"erase {user.handle}: {order}, account {fate}, credentials {creds}"
        if did is not None and creds == "session_expired":
            self.pds.revoke_sessions(did)
        elif did is not None and creds == "neither":
            user.password = f"pw-{self._hex(16)}"  # the admin reset it; the app knows it
            self.pds.change_password(did, user.password)
            self.pds.revoke_sessions(did)
        if did is not None and fate == "deleted_before":
            self.pds.delete_account(did)
            yield f"admin deletes the account of {user.handle}"
        if order in ("moods_first", "unset_atproto"):
            yield from self._delete_moods(user)
        if order == "unset_atproto":
            self.mongo.update(USERS, user.sub, lambda d: d.pop("atproto", None))
            yield f"unset atproto of {user.handle}"
        else:
            self.mongo.delete(USERS, user.sub)
            self.mongo.delete(HANDLES, user.sub)
            yield f"delete users document of {user.handle}"
        if order == "users_first":
            yield from self._delete_moods(user)
        if did is not None and fate == "deleted_after":
            self.pds.delete_account(did)
            yield f"admin deletes the account of {user.handle}"

    def _delete_moods(self, user: User) -> Mutation:
        for doc in self.moods_of(user):
            if self.mongo.delete(MOODS, doc["_id"]):
                yield f"erase mood {doc['_id']}"
        # The newer job deletes the posts too; the older endpoint leaves them behind (their
        # records must go all the same: the user is erased).
        if self.news_rng is not None and self.news_rng.random() < 0.5:
            for doc in self.posts_of(user):
                if self.mongo.delete(POSTS, doc["_id"]):
                    yield f"erase post {doc['_id']}"

    # -- news posts (AC-RECORD-TYPES.md, "news") ----------------------------------------------

    def posts_of(self, user: User) -> list[Doc]:
        return self.mongo.find(POSTS, lambda d: d.get("user") == user.sub)

    def all_posts(self) -> list[Doc]:
        return self.mongo.find(POSTS)

    def pick_news(self, rng: random.Random) -> Mutation:
        owners = {d.get("user") for d in self.all_posts()}
        with_posts = [u for u in self.current() if u.sub in owners]
        kinds: list[tuple[str, float]] = [("post", 5.0)]
        if with_posts:
            kinds += [("post_edit", 2.0), ("post_dead", 1.5), ("post_live", 1.5),
                      ("post_delete", 0.7)]  # fmt: skip
        names, weights = zip(*kinds, strict=True)
        kind = rng.choices(names, weights)[0]
        user = rng.choice(with_posts if kind != "post" else self.current())
        mutation: Mutation = getattr(self, kind)(user, rng)
        return mutation

    def post(self, user: User, rng: random.Random) -> Mutation:
        """A post as the app writes it; sometimes one ingested from Bluesky (its `atproto`
        someone else's: never ours to write), one with no user, or (bad documents) one the
        lexicon refuses."""
        doc: Doc = {"_id": self.object_id(), "user": user.sub, "title": rng.choice(TEXTS[:9]),
                    "text": rng.choice(("", "a body", "🙂" * 40)), "when": self.when(),
                    "url": rng.choice(("", "https://aesthetic.computer/news")),
                    "status": "live"}  # fmt: skip
        odd = rng.random()
        if odd < 0.1:
            did = "did:plc:" + "b" * 24
            doc["external"] = {"source": "bsky"}
            doc["atproto"] = {"rkey": "3lbskyaaaaaa2", "did": did,
                              "uri": f"at://{did}/app.bsky.feed.post/3lbskyaaaaaa2"}  # fmt: skip
            self.theirs[doc["_id"]] = dict(doc["atproto"])
        elif odd < 0.15:
            del doc["user"]
        elif odd < 0.25 and self.bad_docs:
            doc["title"] = rng.choice(("", None, "x" * 301))
        self.mongo.insert(POSTS, doc)
        yield f"post {doc['_id']} of {user.handle}"

    def post_edit(self, user: User, rng: random.Random) -> Mutation:
        doc = rng.choice(self.posts_of(user))
        title = rng.choice(TEXTS[:9]) + rng.choice(("", " (edited)"))
        self.mongo.update(POSTS, doc["_id"], lambda d: d.__setitem__("title", title))
        yield f"post edit {doc['_id']}"

    def post_dead(self, user: User, rng: random.Random) -> Mutation:
        doc = rng.choice(self.posts_of(user))
        self.mongo.update(POSTS, doc["_id"], lambda d: d.__setitem__("status", "dead"))
        yield f"post dead {doc['_id']}"

    def post_live(self, user: User, rng: random.Random) -> Mutation:
        doc = rng.choice(self.posts_of(user))
        self.mongo.update(POSTS, doc["_id"], lambda d: d.__setitem__("status", "live"))
        yield f"post live {doc['_id']}"

    def post_delete(self, user: User, rng: random.Random) -> Mutation:
        doc = rng.choice(self.posts_of(user))
        self.mongo.delete(POSTS, doc["_id"])
        yield f"post delete {doc['_id']}"

    def rescue(self, user: User) -> str:
        """The operator, alerted (the replicator parked the user `erased`), does one of the
        runbook's two things: deletes the account with the admin password, or restores its
        credentials in `users` (to erase the user again once the replicator took them)."""
        assert user.did is not None
        if user.did not in self.pds.repos or self.rng.random() < 0.5:
            if user.did in self.pds.repos:
                self.pds.delete_account(user.did)
            user.rescued = "deleted"
            return f"operator deletes the account of {user.handle}"
        atproto = {"did": user.did, "handle": user.handle, "password": user.password}
        self.mongo.update(USERS, user.sub, lambda d: d.__setitem__("atproto", atproto),
                          upsert=True)  # fmt: skip
        user.rescued, user.restored_at = "restored", self.mongo.position
        return f"operator restores the credentials of {user.handle}"

    def erase_again(self, user: User) -> str:
        """After a restore: the user's document deleted, as the app's job would."""
        self.mongo.delete(USERS, user.sub)
        self.mongo.delete(HANDLES, user.sub)
        user.rescued = "re-erased"
        return f"operator erases {user.handle} again"

    def deactivate(self, user: User) -> Mutation:
        """An account deactivated on the PDS: writes refused until it is reactivated."""
        active = [u for u in self.users if u.did and u.did in self.pds.repos
                  and self.pds.repos[u.did].active]  # fmt: skip
        if active:
            target = self.rng.choice(active)
            assert target.did is not None
            self.pds.repos[target.did].active = False
            yield f"deactivate {target.handle}"

    def reactivate(self, user: User) -> Mutation:
        inactive = self.inactive()
        if inactive:
            target = self.rng.choice(inactive)
            assert target.did is not None
            self.pds.repos[target.did].active = True
            yield f"reactivate {target.handle}"

    def inactive(self) -> list[User]:
        return [u for u in self.users if u.did and u.did in self.pds.repos
                and not self.pds.repos[u.did].active]  # fmt: skip


def live(doc: dict[str, Any] | None) -> bool:
    return doc is not None and not is_deleted(doc.get("deleted"))


def live_post(doc: dict[str, Any] | None) -> bool:
    return doc is not None and doc.get("status") != "dead"
