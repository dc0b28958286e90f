"""Users exactly as production has them: a PDS account, a `users` document, a handle."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from bson import ObjectId

from replicator.store import Store


@dataclass(frozen=True)
class SeededUser:
    sub: str
    handle: str
    did: str | None
    password: str | None

    @property
    def has_account(self) -> bool:
        return self.did is not None


class SeedError(RuntimeError):
    pass


async def create_account(
    pds_url: str, handle: str, password: str, *, admin_password: str | None = None
) -> str:
    """`com.atproto.server.createAccount`; uses an invite code when the PDS requires one."""
    body: dict[str, Any] = {"handle": handle, "password": password,
                            "email": f"{handle.split('.')[0]}@example.test"}  # fmt: skip
    async with httpx.AsyncClient(base_url=f"{pds_url.rstrip('/')}/xrpc/", timeout=30) as http:
        desc = (await http.get("com.atproto.server.describeServer")).json()
        if desc.get("inviteCodeRequired"):
            if not admin_password:
                raise SeedError("this PDS requires invite codes: set PDS_ADMIN_PASSWORD")
            invite = await http.post(
                "com.atproto.server.createInviteCode",
                json={"useCount": 1},
                auth=("admin", admin_password),
            )
            invite.raise_for_status()
            body["inviteCode"] = invite.json()["code"]
        resp = await http.post("com.atproto.server.createAccount", json=body)
        if resp.status_code != 200:
            error = resp.json().get("message", resp.text) if resp.content else resp.reason_phrase
            raise SeedError(f"createAccount {handle}: HTTP {resp.status_code}: {error}")
        return str(resp.json()["did"])


async def seed_user(
    store: Store,
    pds_url: str | None,
    name: str,
    *,
    with_account: bool = True,
    domain: str = "test",
    admin_password: str | None = None,
) -> SeededUser:
    """A user like production's: `users {_id: sub, code, atproto: {did, handle, password}}`
    plus a handles entry; `with_account=False` gives a user without any ATProto account."""
    sub = f"auth0|{secrets.token_hex(12)}"
    handle = f"{name}.{domain}"
    did = password = None
    user: dict[str, Any] = {"_id": sub, "code": secrets.token_hex(4)}
    if with_account:
        if pds_url is None:
            raise SeedError("a PDS URL is needed to create an account")
        password = secrets.token_urlsafe(12)
        did = await create_account(pds_url, handle, password, admin_password=admin_password)
        user["atproto"] = {"did": did, "handle": handle, "password": password}
    await store.users.insert_one(user)
    await store.handles.insert_one({"_id": sub, "handle": name})
    return SeededUser(sub, handle, did, password)


async def insert_mood(
    store: Store, user: str, text: str, *, when: datetime | None = None, **extra: Any
) -> ObjectId:
    doc: dict[str, Any] = {"user": user, "mood": text, "when": when or datetime.now(UTC), **extra}
    result = await store.docs.insert_one(doc)
    return ObjectId(result.inserted_id)
