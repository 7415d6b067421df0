"""The schema registry: schemas by id, fetched once, over its Confluent-compatible REST API.

``GET {url}/schemas/ids/{id}`` (and ``/subjects/{subject}/versions/{version}`` for a
schema's references) with aiohttp, the connector's HTTP library: a fetch never blocks the
event loop, and every job waiting for one schema waits for the same request (one fetch
per id however many records carry it). A schema is fetched once and kept: ids are
immutable in every registry that speaks this API.

What a failure means to the caller::

    SchemaNotFound       the registry answers that the id (or a reference) does not
                         exist, and again NOT_FOUND_CONFIRM_S later (a replica may lag
                         the one the schema was registered on): the record's fault,
                         dead-lettered ``schema_error``
    (anything else)      connection refused, timeout, TLS, 401/403, 5xx, a body that is
                         not the API's: the registry is down or misconfigured. The fetch
                         is retried with a capped backoff until it works; meanwhile
                         ``problem`` says why (``/readyz`` is red with it) and the jobs
                         wait, so fetching pauses once the buffer is full. Nothing is
                         dead-lettered for an outage.

Only this module and ``threads_client`` import aiohttp; foreign errors are translated here.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from connector.config import SchemaRegistrySettings, _secret
from connector.errors import ConfigError, ConnectorError
from connector.metrics import Metrics

log = logging.getLogger(__name__)
ACCEPT = "application/vnd.schemaregistry.v1+json, application/json"
MAX_SCHEMA_BYTES = 4 * 1024 * 1024
MAX_REFERENCE_DEPTH = 32
NOT_FOUND_CACHE_S = 60.0  # a 404 is believed this long: a flood of bad ids is not a flood of GETs
# A 404 is asked again once, this much later, before it is believed: registries replicate
# (Confluent's followers, Apicurio's kafkasql replicas), and a record can reach us before
# the replica answering knows the schema its producer just registered on another one.
NOT_FOUND_CONFIRM_S = 2.0


class SchemaNotFound(ConnectorError):
    """The registry says the schema (or one it references) does not exist (404)."""


class RegistryUnavailable(ConnectorError):
    """One fetch failed for a reason that is the registry's, not the record's."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


@dataclass(frozen=True, slots=True)
class Reference:
    """A schema another one imports: its name there (an Avro type, a .proto file)."""

    name: str
    schema: RegisteredSchema


@dataclass(frozen=True, slots=True)
class RegisteredSchema:
    """A schema as the registry holds it: ``schema_type`` AVRO, PROTOBUF or JSON."""

    schema_id: int | None
    schema_type: str
    text: str
    references: tuple[Reference, ...] = ()


class SchemaRegistry:
    """Fetches and caches schemas; ``problem`` is why the registry cannot be used now."""

    def __init__(
        self,
        settings: SchemaRegistrySettings,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        not_found_confirm_s: float = NOT_FOUND_CONFIRM_S,
    ) -> None:
        if settings.url is None:
            raise ValueError("schema_registry.url is not set")
        self._s = settings
        self._url = settings.url
        self._metrics = metrics
        self._clock = clock
        self._confirm_s = not_found_confirm_s
        self._session: aiohttp.ClientSession | None = None
        self._schemas: dict[int, RegisteredSchema] = {}
        self._missing: dict[int, float] = {}  # id -> when the registry said 404
        self._fetching: dict[int, asyncio.Future[RegisteredSchema]] = {}
        self.problem: str | None = None  # read by /readyz (another thread: one attribute)
        self._failing: dict[int, str] = {}  # id -> why its fetch fails, while it retries
        self._failures = 0
        self._closed = False

    async def __aenter__(self) -> SchemaRegistry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the fetches under way, then close the HTTP session (idempotent)."""
        self._closed = True
        fetching = list(self._fetching.values())
        for future in fetching:
            future.cancel()
        await asyncio.gather(*fetching, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- the API ------------------------------------------------------------------------

    def cached(self, schema_id: int) -> RegisteredSchema | None:
        return self._schemas.get(schema_id)

    async def schema(self, schema_id: int) -> RegisteredSchema:
        """The schema with that id: from the cache, else fetched (retrying an outage for as
        long as it lasts); SchemaNotFound if the registry has no such id."""
        found = self._schemas.get(schema_id)
        if found is not None:
            return found
        missing_at = self._missing.get(schema_id)
        if missing_at is not None and self._clock() - missing_at < NOT_FOUND_CACHE_S:
            raise SchemaNotFound(f"schema id {schema_id} not found in the registry")
        future = self._fetching.get(schema_id)
        if future is None:
            if self._closed:
                raise RegistryUnavailable("the registry client is closed")
            future = asyncio.ensure_future(self._fetch_until_done(schema_id))
            self._fetching[schema_id] = future
            future.add_done_callback(lambda done: self._fetched(schema_id, done))
        # shielded: one job cancelled (a revoke) must not cancel the others' fetch
        return await asyncio.shield(future)

    def _fetched(self, schema_id: int, done: asyncio.Future[RegisteredSchema]) -> None:
        self._fetching.pop(schema_id, None)
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have been cancelled (a revoke)

    async def _fetch_until_done(self, schema_id: int) -> RegisteredSchema:
        try:
            return await self._fetch_retrying(schema_id)
        finally:
            self._failing.pop(schema_id, None)  # cancelled (close) included

    async def _fetch_retrying(self, schema_id: int) -> RegisteredSchema:
        delay = self._s.retry_initial_s
        confirmed = False
        while True:
            try:
                schema = await self._fetch_id(schema_id, depth=0)
            except SchemaNotFound:
                self._healthy(schema_id)
                if not confirmed:  # a replica behind the one it was registered on?
                    confirmed = True
                    await asyncio.sleep(self._confirm_s)
                    continue
                if len(self._missing) >= self._s.max_cached_schemas:
                    self._missing.pop(next(iter(self._missing)))
                self._missing[schema_id] = self._clock()
                raise
            except RegistryUnavailable as exc:
                self._unhealthy(schema_id, str(exc))
                await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))
                delay = min(self._s.retry_max_s, delay * 2)
                continue
            self._healthy(schema_id)
            if len(self._schemas) >= self._s.max_cached_schemas:
                self._schemas.pop(next(iter(self._schemas)))
            self._schemas[schema_id] = schema
            return schema

    def _healthy(self, schema_id: int) -> None:
        """``schema_id`` was fetched (or is known missing): the registry is healthy unless
        another id's fetch still fails (a registry failing one id only stays named)."""
        self._failing.pop(schema_id, None)
        if self._failing:
            self.problem = f"schema registry: {next(iter(self._failing.values()))} (retrying)"
            return
        if self.problem is not None:
            log.info("schema registry is reachable again")
        self.problem = None
        self._failures = 0
        if self._metrics is not None:
            self._metrics.schema_registry_up.set(1)

    def _unhealthy(self, schema_id: int, cause: str) -> None:
        self._failing[schema_id] = cause
        self._failures += 1
        if self._metrics is not None:
            self._metrics.schema_registry_up.set(0)
            self._metrics.schema_registry_failures.inc()
        if self.problem is None:  # one line per outage, not one per retry
            log.warning(
                "schema registry cannot be used, records wait for it: %s",
                cause,
                extra={"registry_problem": cause},
            )
        self.problem = f"schema registry: {cause} (retrying)"

    async def check(self) -> None:
        """One request that needs the credentials (``GET /subjects``); RegistryUnavailable
        if the registry does not answer it (``check-config --online``)."""
        await self._get("/subjects", "the subject list", expect=list)

    # -- fetching -----------------------------------------------------------------------

    async def _fetch_id(self, schema_id: int, depth: int) -> RegisteredSchema:
        path, what = f"/schemas/ids/{schema_id}", f"schema id {schema_id}"
        body = await self._serialized(path, what, await self._get(path, what))
        return await self._registered(schema_id, body, depth)

    async def _fetch_version(self, subject: str, version: int | str, depth: int) -> Any:
        path = f"/subjects/{quote(subject, safe='')}/versions/{quote(str(version), safe='')}"
        what = f"subject {subject!r} version {version}"
        body = await self._serialized(path, what, await self._get(path, what))
        return await self._registered(body.get("id"), body, depth)

    async def _serialized(self, path: str, what: str, body: dict[str, Any]) -> dict[str, Any]:
        """A Protobuf schema served as .proto source is asked again as a serialized
        descriptor (Confluent's ``format=serialized``): protobuf's Python runtime reads
        descriptors, not .proto text. A registry that refuses keeps the source (the
        decoder then says it cannot use it); a connection failure is an outage."""
        text = body.get("schema")
        if str(body.get("schemaType", "")).upper() != "PROTOBUF" or not isinstance(text, str):
            return body
        if _BASE64.fullmatch(text.strip()):
            return body  # a serialized descriptor already
        try:
            again = await self._get(f"{path}?format=serialized", what)
        except SchemaNotFound:
            return body
        except RegistryUnavailable as exc:
            if exc.status is None:
                raise
            return body
        serialized = again.get("schema")
        if isinstance(serialized, str) and _BASE64.fullmatch(serialized.strip()):
            return {**body, "schema": serialized}
        return body  # not base64 (Apicurio's answer): the source, compiled by the decoder

    async def _registered(
        self, schema_id: int | None, body: dict[str, Any], depth: int
    ) -> RegisteredSchema:
        text = body.get("schema")
        if not isinstance(text, str):
            raise RegistryUnavailable("its answer has no 'schema' text: is the URL the API's?")
        schema_type = str(body.get("schemaType") or "AVRO").upper()
        refs: list[Reference] = []
        for ref in body.get("references") or ():
            if depth >= MAX_REFERENCE_DEPTH:
                raise SchemaNotFound(f"references nest over {MAX_REFERENCE_DEPTH} deep")
            try:
                name, subject, version = ref["name"], ref["subject"], ref["version"]
            except (KeyError, TypeError) as exc:
                raise RegistryUnavailable(f"a reference without {exc}") from None
            refs.append(Reference(name, await self._fetch_version(subject, version, depth + 1)))
        return RegisteredSchema(schema_id, schema_type, text, tuple(refs))

    async def _get(self, path: str, what: str, expect: type = dict) -> Any:
        session = self._client()
        try:
            async with session.get(self._url + path, allow_redirects=False) as response:
                raw = await response.content.read(MAX_SCHEMA_BYTES + 1)
                status = response.status
        except aiohttp.ClientSSLError as exc:
            raise RegistryUnavailable(f"TLS failed: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise RegistryUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise RegistryUnavailable(
                f"no answer within {self._s.request_timeout_s:g}s ({what})"
            ) from exc
        if status == 404:
            raise SchemaNotFound(f"{what} not found in the registry")
        if status in (401, 403):
            raise RegistryUnavailable(
                f"HTTP {status} for {what}: check schema_registry's credentials", status
            )
        if status != 200:
            raise RegistryUnavailable(f"HTTP {status} for {what}", status)
        if len(raw) > MAX_SCHEMA_BYTES:
            raise RegistryUnavailable(f"{what} is over {MAX_SCHEMA_BYTES} bytes")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RegistryUnavailable(f"its answer for {what} is not JSON") from exc
        if not isinstance(body, expect):
            raise RegistryUnavailable(f"its answer for {what} is not a JSON {expect.__name__}")
        return body

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RegistryUnavailable("the registry client is closed")
        if self._session is None:
            try:
                self._session = self._new_session()
            except ConfigError as exc:  # a secret file that cannot be read: fixable live
                raise RegistryUnavailable(str(exc)) from exc
            except (OSError, ssl.SSLError) as exc:
                raise RegistryUnavailable(
                    f"schema_registry.ca_file cannot be loaded: {exc}"
                ) from exc
        return self._session

    def _new_session(self) -> aiohttp.ClientSession:
        s = self._s
        headers = {"Accept": ACCEPT}
        if s.username is not None:
            password = _secret(s.password, s.password_file, "schema_registry.password_file")
            pair = f"{s.username}:{password.get_secret_value()}".encode()
            headers["Authorization"] = f"Basic {base64.b64encode(pair).decode('ascii')}"
        elif s.bearer_token is not None or s.bearer_token_file is not None:
            token = _secret(
                s.bearer_token, s.bearer_token_file, "schema_registry.bearer_token_file"
            )
            headers["Authorization"] = f"Bearer {token.get_secret_value()}"
        return aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=s.request_timeout_s),
            connector=aiohttp.TCPConnector(ssl=_ssl_context(s.ca_file), limit=8),
        )


def _ssl_context(ca_file: Path | None) -> ssl.SSLContext | bool:
    if ca_file is None:
        return True  # the system's CAs, for an https URL
    return ssl.create_default_context(cafile=str(ca_file))
