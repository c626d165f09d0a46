"""The admin routes every kind of versioned document has (rule sets, experiment plans): one stored
version, activating one on every node, rolling back to the one active before, deactivating, and
the history an overview shows. gateway.api.rules and gateway.api.experiments add their own."""

from __future__ import annotations

import time
from typing import Generic, NamedTuple, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from gateway.api import wire
from gateway.api.http import ApiError
from gateway.store import StoreError
from gateway.store.documents import Activation, Documents, Follower, State, UnknownVersionError


class History(NamedTuple):
    state: State
    versions: list[wire.DocumentVersion]
    activations: list[Activation]


K = TypeVar("K", bound=Follower)


class VersionsApi(Generic[K]):
    """`keeper` follows the documents on this node; `noun` names a version in messages
    ("rule-set version 3", "plan version 3")."""

    noun = "version"

    def __init__(self, keeper: K) -> None:
        self.keeper = keeper

    @property
    def documents(self) -> Documents:
        return self.keeper.documents

    async def check(self, body: bytes, number: int) -> None:
        """Raise ApiError if the stored version `number` may not be served now."""

    async def _overview(self) -> Response:
        raise NotImplementedError

    async def history(self) -> History:
        documents = self.documents
        try:
            state = await documents.state()
            revisions = await documents.revisions()
            activations = await documents.activations()
        except StoreError as exc:
            raise ApiError(503, "store-unavailable", str(exc)) from None
        versions = [
            wire.DocumentVersion(r.version, r.created_at, r.sha256, r.size, r.note, r.version == state.active)
            for r in revisions
        ]
        return History(state, versions, activations)

    def _version(self, request: Request) -> int:
        text = request.path_params["version"]
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            raise ApiError(404, "not-found", f"no {self.noun} {text!r}; versions are 1, 2, ...", field="version")
        return int(text)

    async def version(self, request: Request) -> Response:
        number = self._version(request)
        try:
            body = await self.documents.get(number)
        except StoreError as exc:
            raise ApiError(503, "store-unavailable", str(exc)) from None
        if body is None:
            raise ApiError(404, "not-found", f"no {self.noun} {number}", field="version")
        return Response(body, media_type="application/json")

    async def activate(self, request: Request) -> Response:
        return await self._activate(self._version(request))

    async def _activate(self, number: int | None) -> Response:
        documents = self.documents
        try:
            if number is not None:
                body = await documents.get(number)
                if body is None:
                    raise ApiError(404, "not-found", f"no {self.noun} {number}", field="version")
                await self.check(body, number)  # what it depends on may have changed since it was stored
            await documents.activate(number, now=time.time())
        except UnknownVersionError:
            raise ApiError(404, "not-found", f"no {self.noun} {number}", field="version") from None
        except StoreError as exc:
            raise ApiError(503, "store-unavailable", str(exc)) from None
        await self.keeper.refresh()
        return await self._overview()

    async def rollback(self, request: Request) -> Response:
        try:
            activations = await self.documents.activations()
            state = await self.documents.state()
        except StoreError as exc:
            raise ApiError(503, "store-unavailable", str(exc)) from None
        # The version active before the current one: the last activation of another version.
        for activation in reversed(activations[:-1]):
            if activation.version != state.active:
                return await self._activate(activation.version)
        raise ApiError(409, "nothing-to-roll-back", "no earlier activation to go back to")

    async def deactivate(self, request: Request) -> Response:
        return await self._activate(None)
