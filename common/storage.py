"""S3 access for framecap: one small wrapper over a boto3 client, built from :class:`S3Config`.

Works with AWS S3 and the S3 gateways of SeaweedFS, MinIO and Ceph RGW (path-style addressing
when ``config.path_style``). Every failure is raised as :class:`StorageError` naming the
operation, the bucket and the key, ``from`` the botocore error; a missing object or bucket is
the subclass :class:`ObjectNotFoundError`. Credentials are never logged nor put in a message.

Idempotent writes: :meth:`ObjectStore.put_if_absent` sends ``If-None-Match: *`` (S3 conditional
writes, AWS since 2024-08; SeaweedFS answers 412 on an existing key), so a redelivered frame
never replaces the bytes stored first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from common.config import S3Config

logger = logging.getLogger(__name__)

_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_PRECONDITION_FAILED = {"412", "PreconditionFailed"}
_CONDITIONAL_CONFLICT = {"409", "ConditionalRequestConflict"}


class StorageError(RuntimeError):
    """An S3 operation that failed; ``op``, ``bucket`` and ``key`` say which and where."""

    def __init__(self, op: str, bucket: str, key: str | None, reason: str) -> None:
        where = f"s3://{bucket}/{key}" if key is not None else f"s3://{bucket}"
        super().__init__(f"S3 {op} {where} failed: {reason}")
        self.op = op
        self.bucket = bucket
        self.key = key
        self.reason = reason


class ObjectNotFoundError(StorageError):
    """The object (or its bucket) does not exist."""


@dataclass(frozen=True)
class StoredObject:
    """An object read back: its bytes, user metadata (lower-case names), content type, ETag."""

    body: bytes
    metadata: dict[str, str]
    content_type: str | None
    etag: str | None


def error_code(err: BaseException) -> str:
    """The S3 error code of a botocore ClientError (``NoSuchKey``, ``412``...), else ``''``."""
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code")
        if code:
            return str(code)
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(status or "")
    return ""


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
        cls = ObjectNotFoundError if error_code(err) in _NOT_FOUND else StorageError
        return cls(op, self.bucket, key, _reason(err))

    def ensure_bucket(self) -> bool:
        """Create the bucket unless it exists. Returns True if this call created it.

        Raises:
            StorageError: the bucket cannot be checked or created (credentials, network).
        """
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as err:
            if error_code(err) not in _NOT_FOUND:
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
            ObjectNotFoundError: no such key (or bucket).
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
            ObjectNotFoundError: no such key (or bucket).
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
