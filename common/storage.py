"""S3 access for framecap: one small wrapper over a boto3 client, built from :class:`S3Config`.

Works with AWS S3 and the S3 gateways of SeaweedFS, MinIO and Ceph RGW (path-style addressing
when ``config.path_style``). Every failure is raised as :class:`StorageError` naming the
operation, the bucket and the key, ``from`` the botocore error; a missing object is the subclass
:class:`ObjectNotFoundError`, a missing bucket :class:`BucketNotFoundError`. Credentials are
never logged nor put in a message.

What can heal and what cannot (:attr:`StorageError.permanent`): connection errors, timeouts,
5xx answers and throttling are outages, worth retrying; wrong or missing credentials
(``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, no keys at all), ``AccessDenied``, a missing
bucket and other 4xx refusals answer the same however often they are asked, so a service should
stop and say why (:attr:`StorageError.hint` says where to look). :meth:`ObjectStore.probe` checks
the credentials and the bucket at start (and creates the bucket when allowed).

Idempotent writes: :meth:`ObjectStore.put_if_absent` sends ``If-None-Match: *`` (S3 conditional
writes, AWS since 2024-08; SeaweedFS answers 412 on an existing key), so a redelivered frame
never replaces the bytes stored first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    InvalidRegionError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
)

from common.config import S3Config

logger = logging.getLogger(__name__)

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_BUCKET_MISSING = {"NoSuchBucket"}
_PRECONDITION_FAILED = {"412", "PreconditionFailed"}
_CONDITIONAL_CONFLICT = {"409", "ConditionalRequestConflict"}
# Error codes (S3 API reference, "Error responses") that no retry heals, by what to check.
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                     "TokenRefreshRequired", "NotSignedUp", "InvalidSecurity", "MissingSecurityHeader"}
_ACCESS_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidObjectState",
                 "403", "401"}
_ENDPOINT_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException",
                   "InvalidBucketName", "301"}
# 4xx answers that can heal: a timeout, throttling, a concurrent write, a failed precondition.
_RETRYABLE_4XX = {"RequestTimeout", "RequestTimeTooSkewed", "SlowDown", "Throttling",
                  "ThrottlingException", "TooManyRequests", "RequestLimitExceeded",
                  "OperationAborted", "408", "429"} | _CONDITIONAL_CONFLICT | _PRECONDITION_FAILED
# botocore errors raised before any request is sent that no retry heals.
_PERMANENT_BOTOCORE = (NoCredentialsError, PartialCredentialsError, ParamValidationError,
                       NoRegionError, InvalidRegionError)
PROBE_KEY = "frames/.framecap-probe"  # never written: :meth:`ObjectStore.probe` GETs it


class StorageError(RuntimeError):
    """An S3 operation that failed; ``op``, ``bucket`` and ``key`` say which and where.

    Attributes:
        code: the S3 error code (``NoSuchBucket``, ``SignatureDoesNotMatch``, ``403`` for an
            answer without a body) or the botocore error's class name; ``""`` if unknown.
        permanent: True if asking again cannot help (credentials, access, a missing bucket,
            another 4xx refusal); False for outages (connection errors, timeouts, 5xx,
            throttling), which heal.
    """

    def __init__(
        self,
        op: str,
        bucket: str,
        key: str | None,
        reason: str,
        *,
        code: str = "",
        permanent: bool = False,
    ) -> None:
        where = f"s3://{bucket}/{key}" if key is not None else f"s3://{bucket}"
        super().__init__(f"S3 {op} {where} failed: {reason}")
        self.op = op
        self.bucket = bucket
        self.key = key
        self.reason = reason
        self.code = code
        self.permanent = permanent

    @property
    def action(self) -> str:
        """What was being done, in words: ``listing outbox/``, ``writing frames/...``."""
        verb = {"list_objects_v2": "listing", "get_object": "reading", "head_object": "checking",
                "delete_object": "deleting", "head_bucket": "checking the bucket",
                "create_bucket": "creating the bucket", "probe": "checking access to the bucket"}
        if self.op.startswith("put_object"):
            return f"writing {self.key}"
        doing = verb.get(self.op, self.op)
        return doing if self.op in {"head_bucket", "create_bucket", "probe"} else f"{doing} {self.key}"

    @property
    def hint(self) -> str:
        """Where to look, for a permanent error; ``""`` for an outage."""
        if not self.permanent:
            return ""
        code = self.code
        if code in _CREDENTIAL_CODES or code in {"NoCredentialsError", "PartialCredentialsError"}:
            return ("the S3 credentials are wrong or missing: check s3.access_key_id and "
                    "s3.secret_access_key ($FRAMECAP_S3_ACCESS_KEY_ID, "
                    "$FRAMECAP_S3_SECRET_ACCESS_KEY)")
        if code in _BUCKET_MISSING:
            return (f"bucket {self.bucket} does not exist: create it, or set s3.create_bucket: true "
                    "to let the service create it")
        if code in _ACCESS_CODES:
            return (f"this S3 identity may not do this on s3://{self.bucket}: check its policy "
                    "(and that it is the identity meant for this service)")
        if code in _ENDPOINT_CODES:
            return "check s3.bucket, s3.region and s3.endpoint_url"
        return "S3 refuses this request; asking again does not help"


class ObjectNotFoundError(StorageError):
    """The object does not exist. (A HEAD answer carries no error code: a HEAD of an object in
    a bucket that does not exist looks like this too.)"""


class BucketNotFoundError(StorageError):
    """The bucket does not exist (``NoSuchBucket``); permanent unless the caller creates it."""


@dataclass(frozen=True)
class StoredObject:
    """An object read back: its bytes, user metadata (lower-case names), content type, ETag."""

    body: bytes
    metadata: dict[str, str]
    content_type: str | None
    etag: str | None


@dataclass(frozen=True)
class ListedObject:
    """One key of a listing: its name, when it was last written (UTC, whole seconds on most
    servers; None if the server did not say) and its size in bytes."""

    key: str
    last_modified: datetime | None
    size: int


def error_code(err: BaseException) -> str:
    """The S3 error code of a botocore ClientError (``NoSuchKey``, ``412``...), else ``''``."""
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code")
        if code:
            return str(code)
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(status or "")
    return ""


def _status(err: BaseException) -> int | None:
    if isinstance(err, ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    return None


def is_permanent(err: BaseException) -> bool:
    """True if repeating the call that raised ``err`` (a botocore error) cannot succeed: wrong or
    missing credentials, access denied, a missing bucket, any other 4xx but timeouts, throttling,
    conflicts and failed preconditions. Connection errors, timeouts and 5xx are not permanent."""
    if isinstance(err, _PERMANENT_BOTOCORE):
        return True
    if not isinstance(err, ClientError):
        return False
    code = error_code(err)
    if code in _CREDENTIAL_CODES or code in _ACCESS_CODES or code in _BUCKET_MISSING:
        return True
    if code in _ENDPOINT_CODES:
        return True
    if code in _RETRYABLE_4XX or code in _NOT_FOUND:
        return False
    status = _status(err)
    return status is not None and 400 <= status < 500


def _reason(err: BaseException) -> str:
    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{error.get('Code', '?')} (HTTP {status}): {error.get('Message', '')}".rstrip(": ")
    return f"{type(err).__name__}: {err}"


def make_s3_client(
    config: S3Config,
    *,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 30.0,
    max_attempts: int = 4,
) -> Any:
    """A boto3 S3 client for ``config``.

    Args:
        config: endpoint (AWS when None), region, addressing style and credentials (SecretStr;
            when absent boto3's default chain applies: environment, ~/.aws, instance role).
        connect_timeout_s: TCP connect timeout, seconds.
        read_timeout_s: socket read timeout, seconds.
        max_attempts: total attempts per call, first one included (botocore "standard" retries,
            exponential backoff with jitter, on throttling, 5xx and connection errors).
    """
    botocore_config = Config(
        region_name=config.region,
        signature_version="s3v4",
        s3={"addressing_style": "path" if config.path_style else "auto"},
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"max_attempts": max_attempts, "mode": "standard"},
    )
    kwargs: dict[str, Any] = {}
    if config.access_key_id is not None:
        kwargs["aws_access_key_id"] = config.access_key_id.get_secret_value()
    if config.secret_access_key is not None:
        kwargs["aws_secret_access_key"] = config.secret_access_key.get_secret_value()
    return boto3.session.Session().client(
        "s3", endpoint_url=config.endpoint_url, config=botocore_config, **kwargs
    )


class ObjectStore:
    """One bucket of an S3 service. Thread-safe (boto3 clients are).

    Args:
        config: where and how to connect; ``config.bucket`` is the bucket used.
        client: an existing boto3 S3 client (else one is made with :func:`make_s3_client`).
        **client_options: passed to :func:`make_s3_client` (timeouts, attempts).
    """

    def __init__(self, config: S3Config, *, client: Any = None, **client_options: Any) -> None:
        self.config = config
        self.bucket = config.bucket
        self.client = client if client is not None else make_s3_client(config, **client_options)

    def __repr__(self) -> str:
        return f"ObjectStore(endpoint={self.config.endpoint_url!r}, bucket={self.bucket!r})"

    def _fail(self, op: str, key: str | None, err: BaseException) -> StorageError:
        code = error_code(err) or (type(err).__name__ if isinstance(err, BotoCoreError) else "")
        cls: type[StorageError] = StorageError
        if code in _BUCKET_MISSING or (op == "head_bucket" and code in _NOT_FOUND):
            cls, code = BucketNotFoundError, "NoSuchBucket"
        elif code in _NOT_FOUND:
            cls = ObjectNotFoundError
        return cls(op, self.bucket, key, _reason(err), code=code,
                   permanent=cls is BucketNotFoundError or is_permanent(err))

    def probe(self, *, create_bucket: bool = False, key: str = PROBE_KEY) -> bool:
        """Check the credentials and the bucket, as a service does at start: GET ``key``, which
        never exists (S3 then answers NoSuchKey, or why it would not serve us).

        Returns True if this call created the bucket (missing, and ``create_bucket``).

        ``AccessDenied`` on the probe is not an error: AWS answers it for a missing key to an
        identity without ``s3:ListBucket``, which a writer need not have (logged at DEBUG; a
        real refusal shows on the first write).

        Raises:
            StorageError: ``permanent`` (credentials, a missing bucket not created, another
                refusal) or not (S3 does not answer: connection error, timeout, 5xx).
        """
        cause: Exception
        try:
            self.client.get_object(Bucket=self.bucket, Key=key)
            return False  # someone wrote it; the bucket answers all the same
        except ClientError as err:
            code = error_code(err)
            if code in _NOT_FOUND:
                return False
            if code == "AccessDenied":
                logger.debug("s3://%s: probe answered AccessDenied (no s3:ListBucket?)", self.bucket)
                return False
            cause = err
        except BotoCoreError as err:
            cause = err
        failure = self._fail("probe", None, cause)
        if isinstance(failure, BucketNotFoundError) and create_bucket:
            return self.ensure_bucket()
        raise failure from cause

    def ensure_bucket(self) -> bool:
        """Create the bucket unless it exists. Returns True if this call created it.

        Raises:
            StorageError: the bucket cannot be checked or created (credentials, network).
        """
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as err:
            if error_code(err) not in _NOT_FOUND | _BUCKET_MISSING:
                raise self._fail("head_bucket", None, err) from err
        except BotoCoreError as err:
            raise self._fail("head_bucket", None, err) from err
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.config.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.config.region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as err:
            if error_code(err) in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                return False
            raise self._fail("create_bucket", None, err) from err
        except BotoCoreError as err:
            raise self._fail("create_bucket", None, err) from err
        logger.info("created bucket %s", self.bucket)
        return True

    def put(
        self,
        key: str,
        body: bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str = "application/octet-stream",
    ) -> None:
        """Write ``body`` under ``key``, replacing any object there.

        Raises:
            StorageError: the put failed.
        """
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=body, Metadata=dict(metadata or {}),
                ContentType=content_type,
            )
        except (ClientError, BotoCoreError) as err:
            raise self._fail("put_object", key, err) from err

    def put_if_absent(
        self,
        key: str,
        body: bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str = "application/octet-stream",
    ) -> bool:
        """Write ``body`` under ``key`` only if no object is there (``If-None-Match: *``).

        Returns True if this call stored the object, False if an object already existed (its
        bytes are left as they were). If a first attempt stored the object but its answer was
        lost, botocore's retry sees 412 and this returns False: either way the object is there.

        Raises:
            StorageError: the put failed for another reason (credentials, network, no bucket).
        """
        for attempt in range(3):
            try:
                self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=body, Metadata=dict(metadata or {}),
                    ContentType=content_type, IfNoneMatch="*",
                )
                return True
            except ClientError as err:
                code = error_code(err)
                if code in _PRECONDITION_FAILED:
                    logger.debug("s3://%s/%s already exists; kept the stored bytes", self.bucket, key)
                    return False
                if code in _CONDITIONAL_CONFLICT and attempt < 2:
                    time.sleep(0.1 * (attempt + 1))  # a concurrent conditional write is running
                    continue
                raise self._fail("put_object(If-None-Match)", key, err) from err
            except BotoCoreError as err:
                raise self._fail("put_object(If-None-Match)", key, err) from err
        raise StorageError("put_object(If-None-Match)", self.bucket, key, "conflicting writes")

    def get_object(self, key: str) -> StoredObject:
        """Read an object with its metadata.

        Raises:
            ObjectNotFoundError: no such key.
            BucketNotFoundError: no such bucket.
            StorageError: any other failure, reading the body included.
        """
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
            body = answer["Body"].read()
        except (ClientError, BotoCoreError) as err:
            raise self._fail("get_object", key, err) from err
        return StoredObject(
            body=body,
            metadata={k.lower(): v for k, v in answer.get("Metadata", {}).items()},
            content_type=answer.get("ContentType"),
            etag=answer.get("ETag"),
        )

    def get(self, key: str) -> bytes:
        """An object's bytes; raises ObjectNotFoundError or StorageError like :meth:`get_object`."""
        return self.get_object(key).body

    def head_metadata(self, key: str) -> dict[str, str]:
        """An object's user metadata (``x-amz-meta-*``, names lower-cased), without its body.

        Raises:
            ObjectNotFoundError: no such key (also a missing bucket: a HEAD answer has no code).
            StorageError: any other failure.
        """
        try:
            answer = self.client.head_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as err:
            raise self._fail("head_object", key, err) from err
        return {k.lower(): v for k, v in answer.get("Metadata", {}).items()}

    def exists(self, key: str) -> bool:
        """True if ``key`` exists; raises StorageError on anything but "not found"."""
        try:
            self.head_metadata(key)
        except ObjectNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        """Delete ``key`` (no error if it is absent); raises StorageError on failure."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as err:
            raise self._fail("delete_object", key, err) from err

    def list_keys(
        self, prefix: str = "", *, start_after: str | None = None, page_size: int = 1000
    ) -> Iterator[str]:
        """Every key under ``prefix`` in lexicographic order, one ListObjectsV2 page at a time.

        A generator: pages are fetched as it is consumed. Raises StorageError (from the
        iteration) if a page cannot be listed.
        """
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": page_size}
        if start_after:
            kwargs["StartAfter"] = start_after
        while True:
            try:
                page = self.client.list_objects_v2(**kwargs)
            except (ClientError, BotoCoreError) as err:
                raise self._fail("list_objects_v2", prefix, err) from err
            for item in page.get("Contents", []):
                yield item["Key"]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            kwargs["ContinuationToken"] = token
            kwargs.pop("StartAfter", None)

    def list_pages(
        self, prefix: str = "", *, start_after: str | None = None, page_size: int = 1000
    ) -> Iterator[list[ListedObject]]:
        """The keys under ``prefix`` after ``start_after``, in lexicographic (UTF-8 byte)
        order, one ListObjectsV2 request per page of at most ``page_size`` keys.

        A generator: each page is requested when the previous one is consumed (nothing is
        requested before the first ``next``). Raises StorageError (from the iteration) if a page
        cannot be listed.
        """
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": page_size}
        if start_after:
            kwargs["StartAfter"] = start_after
        while True:
            try:
                page = self.client.list_objects_v2(**kwargs)
            except (ClientError, BotoCoreError) as err:
                raise self._fail("list_objects_v2", prefix, err) from err
            yield [ListedObject(item["Key"], item.get("LastModified"), int(item.get("Size", 0)))
                   for item in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            kwargs["ContinuationToken"] = token
            kwargs.pop("StartAfter", None)

    def list_prefixes(self, prefix: str = "", delimiter: str = "/") -> Iterator[str]:
        """The "folders" right under ``prefix``: each distinct ``prefix + name + delimiter`` of
        the keys below it (ListObjectsV2 CommonPrefixes, in lexicographic order), e.g.
        ``frames/cam1/`` for ``list_prefixes("frames/")``. One request per 1,000 folders (and
        keys right under ``prefix``), however many keys lie deeper.

        A generator; raises StorageError (from the iteration) if a page cannot be listed.
        """
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": delimiter}
        while True:
            try:
                page = self.client.list_objects_v2(**kwargs)
            except (ClientError, BotoCoreError) as err:
                raise self._fail("list_objects_v2", prefix, err) from err
            for item in page.get("CommonPrefixes", []):
                yield item["Prefix"]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            kwargs["ContinuationToken"] = token
