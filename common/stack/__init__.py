"""The local stack: mosquitto (MQTT) and SeaweedFS (S3) on 127.0.0.1, under one state directory.

``framecap stack up|down|status|add-device|env`` and the :class:`LocalStack` Python API (used by
the tests' fixtures and by ``framecap demo``).

mosquitto runs with our generated config: a listener on 127.0.0.1 and a free port (plus an
optional TLS listener), persistence on, ``max_queued_messages`` raised, and access control by its
dynamic security plugin (``mosquitto_dynamic_security.so``, ``STATE/mosquitto/dynamic-security.json``
written from the accounts file at each start; PBKDF2-SHA512 hashes): ``allow_anonymous false``,
one client per account and one role per service or device, everything not granted denied.
Accounts:

| account | may publish | may subscribe (and receive) |
| --- | --- | --- |
| ``admin`` | everything | everything, ``$share/#``, ``$CONTROL/dynamic-security/#`` |
| ``ingest`` | ``P/+/acks`` | ``P/+/frames``, ``P/+/status`` (plain or ``$share/GROUP/...``) |
| ``worker`` | ``P/+/captions`` | ``P/+/acks`` (plain or shared; the acks tell it of new frames) |
| ``web`` | ``P/+/alerts`` | ``P/+/captions``, ``P/+/status`` (plain or shared) |
| device ``D`` | ``P/D/frames``, ``P/D/status`` | ``P/D/acks``, ``P/D/captions``, ``P/D/alerts`` (not shared) |

``P`` is the topic prefix; by default the ACLs accept any one-level prefix (``+``), so tests can
give each test its own prefix; device isolation holds under every prefix. Subscriptions are
checked when they are made (``subscribePattern``): a SUBSCRIBE to anything else is answered
"not authorized" (SUBACK 0x87), so a device can join no service's shared subscription (with an
ACL file, mosquitto 2.0.11 granted any SUBSCRIBE, put a device into the ingest's share group and
dropped its round-robin turns). Delivery is checked too (``publishClientReceive``); a denied
publish is answered "not authorized" (MQTT v5 PUBACK 135). :meth:`LocalStack.add_device` adds a
device to a running broker through ``$CONTROL/dynamic-security/v1`` (as ``admin``).

SeaweedFS is one ``weed server -s3`` process with an identities file, so S3 keys are checked.
One S3 identity per role, with least privilege (:data:`~common.stack.state.S3_GRANTS`): ``admin``
(everything, creates buckets), ``ingest`` (writes and reads ``frames/``), ``worker`` (reads and
lists ``frames/``, writes ``captions/`` and ``outbox/``), ``web`` (reads ``frames/`` and
``captions/``); devices have none. Each grant names its bucket; ``s3_config(bucket, role=...)``
grants a new bucket on first use (identities file rewritten, SeaweedFS reloads on SIGHUP).
Secrets are generated into ``STATE/secrets`` (mode 0700, files 0600) and never printed by
``up`` or ``status``.

State directory layout::

    stack.json                       endpoints, ports, PIDs, paths (no secrets)
    secrets/mqtt-accounts.json       {user: {"password", "role"}}
    secrets/s3-credentials.json      {role: {"access_key_id", "secret_access_key"}} per S3 role
    secrets/s3-identities.json       SeaweedFS -s3.config (reloaded with SIGHUP)
    mosquitto/mosquitto.conf, dynamic-security.json, data/, mosquitto.log, tls/
    seaweedfs/data/, tmp/, weed.log

Modules: :mod:`~common.stack.process` (processes, ports, :class:`StackError`),
:mod:`~common.stack.state` (the state directory), :mod:`~common.stack.mosquitto`,
:mod:`~common.stack.seaweedfs`, :mod:`~common.stack.local` (:class:`LocalStack`),
:mod:`~common.stack.postgres` (:class:`PostgresServer`: a throwaway PostgreSQL for the tests and
the demo of ``framecap web``) and :mod:`~common.stack.cli` (``framecap stack``).
"""

from common.stack.cli import get_args_parser, main
from common.stack.local import LocalStack
from common.stack.mosquitto import (
    acl_text,
    dynsec_json,
    find_dynsec_plugin,
    find_mosquitto,
    mosquitto_conf_text,
    mosquitto_password_hash,
    mqtt_connack,
)
from common.stack.postgres import PostgresServer, find_postgres
from common.stack.process import (
    GRPC_OFFSET,
    HOST,
    StackError,
    pick_port,
    pid_alive,
    port_is_free,
    server_pids,
)
from common.stack.seaweedfs import PROBE_KEY, find_weed, weed_command
from common.stack.state import (
    DEFAULT_BUCKET,
    DEFAULT_STATE_DIR,
    ROLES,
    S3_GRANTS,
    S3_ROLES,
    STATE_VERSION,
    s3_identities,
)

__all__ = [
    "DEFAULT_BUCKET",
    "DEFAULT_STATE_DIR",
    "GRPC_OFFSET",
    "HOST",
    "PROBE_KEY",
    "ROLES",
    "S3_GRANTS",
    "S3_ROLES",
    "STATE_VERSION",
    "LocalStack",
    "PostgresServer",
    "StackError",
    "acl_text",
    "dynsec_json",
    "find_dynsec_plugin",
    "find_mosquitto",
    "find_postgres",
    "find_weed",
    "get_args_parser",
    "main",
    "mosquitto_conf_text",
    "mosquitto_password_hash",
    "mqtt_connack",
    "pick_port",
    "pid_alive",
    "port_is_free",
    "s3_identities",
    "server_pids",
    "weed_command",
]
