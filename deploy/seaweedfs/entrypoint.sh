#!/bin/sh
# Writes SeaweedFS's S3 identities (-s3.config) from the environment, one identity per framecap
# role with least privilege, runs `weed "$@" -s3.config=...`, then creates the bucket with
# `weed shell` (only the admin identity may create buckets; the services' identities cannot).
#   ingest: Read+Write BUCKET/frames/*     (Write also covers DeleteObject in SeaweedFS)
#   worker: Read+List BUCKET/frames/*, Read+List+Write BUCKET/captions/*, List+Write BUCKET/outbox/*
#   web:    Read+List BUCKET/frames/* and BUCKET/captions/*
#   admin:  everything (operators, bucket creation); devices get no S3 identity at all.
set -eu
rm -f /tmp/framecap-bucket-ready
bucket="${FRAMECAP_S3_BUCKET:-framecap}"
conf="${FRAMECAP_S3_CONFIG:-/tmp/framecap-s3-identities.json}"
master="${FRAMECAP_WEED_MASTER:-localhost:9333}"

check() {  # name value: keys go into JSON unescaped, so allow only safe characters
  case "$2" in
    ""|*[!A-Za-z0-9+/=_.-]*) echo "entrypoint: $1 is empty or has characters other than A-Za-z0-9+/=_.-" >&2; exit 2 ;;
  esac
}
identity() {  # name key secret actions...
  name=$1 key=$2 secret=$3; shift 3
  check "key of $name" "$key"; check "secret of $name" "$secret"
  actions=""
  for a in "$@"; do actions="$actions${actions:+, }\"$a\""; done
  printf '    {"name": "framecap-%s", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], "actions": [%s]}' \
    "$name" "$key" "$secret" "$actions"
}
b="$bucket"
umask 077
{
  echo '{"identities": ['
  identity admin "$FRAMECAP_S3_ADMIN_ACCESS_KEY_ID" "$FRAMECAP_S3_ADMIN_SECRET_ACCESS_KEY" \
    Admin Read Write List Tagging; echo ','
  identity ingest "$FRAMECAP_S3_INGEST_ACCESS_KEY_ID" "$FRAMECAP_S3_INGEST_SECRET_ACCESS_KEY" \
    "Write:$b/frames/*" "Read:$b/frames/*"; echo ','
  identity worker "$FRAMECAP_S3_WORKER_ACCESS_KEY_ID" "$FRAMECAP_S3_WORKER_SECRET_ACCESS_KEY" \
    "Read:$b/frames/*" "List:$b/frames/*" "Read:$b/captions/*" "List:$b/captions/*" \
    "Write:$b/captions/*" "List:$b/outbox/*" "Write:$b/outbox/*"; echo ','
  identity web "$FRAMECAP_S3_WEB_ACCESS_KEY_ID" "$FRAMECAP_S3_WEB_SECRET_ACCESS_KEY" \
    "Read:$b/frames/*" "Read:$b/captions/*" "List:$b/captions/*" "List:$b/frames/*"; echo
  echo ']}'
} > "$conf"

weed "$@" -s3.config="$conf" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
tries=0
shell() { if command -v timeout >/dev/null; then timeout 30 weed shell -master="$master"; else weed shell -master="$master"; fi; }
until printf 's3.bucket.create -name %s\ns3.bucket.list\n' "$bucket" | shell 2>/dev/null \
    | grep -qE "^[[:space:]]*$bucket[[:space:]]"; do
  tries=$((tries + 1))
  if [ "$tries" -gt 120 ] || ! kill -0 "$pid" 2>/dev/null; then
    echo "entrypoint: could not create bucket $bucket through weed shell" >&2
    break
  fi
  sleep 1
done
# for a healthcheck: test -f /tmp/framecap-bucket-ready
[ "$tries" -gt 120 ] || : > /tmp/framecap-bucket-ready
status=0
wait "$pid" || status=$?
# a TERM ended the first wait: wait again for weed's own exit
if kill -0 "$pid" 2>/dev/null; then wait "$pid" || status=$?; fi
exit "$status"
