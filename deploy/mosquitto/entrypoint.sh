#!/bin/sh
# Writes the accounts and roles of mosquitto's dynamic security plugin from the environment,
# then runs the broker. Subscriptions are checked when they are made: a device may subscribe only
# to its own acks, captions and alerts, so it can join no service's shared subscription
# ($share/ingest/..., $share/worker/...) and read no other device's topics.
#   FRAMECAP_MQTT_{INGEST,WORKER,WEB}_PASSWORD  service accounts
#   FRAMECAP_MQTT_DEVICES     space-separated device_id:password pairs (device_id = user name)
#   FRAMECAP_MQTT_ADMIN_PASSWORD  optional: an `admin` account for mosquitto_ctrl (add a device
#                             live: mosquitto_ctrl -u admin dynsec createClient ...; put it in
#                             FRAMECAP_MQTT_DEVICES too, since this file is rewritten at start)
#   FRAMECAP_MQTT_TOPIC_PREFIX   topic prefix (default framecap)
set -eu
data="${FRAMECAP_MOSQUITTO_DATA:-/mosquitto/data}"
conf="${FRAMECAP_MOSQUITTO_CONF:-/mosquitto/config/mosquitto.conf}"
p="${FRAMECAP_MQTT_TOPIC_PREFIX:-framecap}"
out="$data/dynamic-security.json"
umask 077
hashes="$data/.passwd.tmp"
: > "$hashes"

check_id() {
  case "$1" in
    ""|*[!A-Za-z0-9._-]*) echo "entrypoint: bad account name '$1' (letters, digits, . _ -)" >&2; exit 2 ;;
  esac
}
acl() { printf '{"acltype": "%s", "topic": "%s", "priority": 0, "allow": true}' "$1" "$2"; }
consume() {  # kinds...: plain and shared subscriptions of every device's topic of that kind
  sep=""
  for kind in "$@"; do
    printf '%s%s, %s, %s' "$sep" "$(acl subscribePattern "$p/+/$kind")" \
      "$(acl subscribePattern "\$share/+/$p/+/$kind")" "$(acl publishClientReceive "$p/+/$kind")"
    sep=", "
  done
}
role_acls() {  # role user
  case "$1" in
    admin)
      sep=""
      for topic in "#" "\$share/#" "\$CONTROL/dynamic-security/#" "\$SYS/#"; do
        for type in subscribePattern publishClientReceive publishClientSend; do
          printf '%s%s' "$sep" "$(acl "$type" "$topic")"; sep=", "
        done
      done ;;
    ingest) printf '%s, %s' "$(consume frames status)" "$(acl publishClientSend "$p/+/acks")" ;;
    worker) printf '%s, %s' "$(consume acks)" "$(acl publishClientSend "$p/+/captions")" ;;
    web) printf '%s, %s' "$(consume captions status)" "$(acl publishClientSend "$p/+/alerts")" ;;
    device)
      printf '%s, %s' "$(acl publishClientSend "$p/$2/frames")" "$(acl publishClientSend "$p/$2/status")"
      for kind in acks captions alerts; do
        printf ', %s, %s' "$(acl subscribePattern "$p/$2/$kind")" "$(acl publishClientReceive "$p/$2/$kind")"
      done ;;
  esac
}

clients="" roles=""
add() {  # user password role
  check_id "$1"
  [ -n "$2" ] || { echo "entrypoint: empty password for $1" >&2; exit 2; }
  mosquitto_passwd -b "$hashes" "$1" "$2"
  # mosquitto_passwd writes user:$7$iterations$salt$hash, the plugin's own fields
  line=$(grep "^$1:" "$hashes")
  iterations=$(echo "$line" | cut -d'$' -f3)
  salt=$(echo "$line" | cut -d'$' -f4)
  hash=$(echo "$line" | cut -d'$' -f5)
  if [ "$3" = device ]; then rolename="device:$1"; else rolename="$3"; fi
  client=$(printf '{"username": "%s", "password": "%s", "salt": "%s", "iterations": %s, "roles": [{"rolename": "%s"}]}' \
    "$1" "$hash" "$salt" "$iterations" "$rolename")
  role=$(printf '{"rolename": "%s", "acls": [%s]}' "$rolename" "$(role_acls "$3" "$1")")
  clients="$clients${clients:+, }$client"
  roles="$roles${roles:+, }$role"
}

[ -z "${FRAMECAP_MQTT_ADMIN_PASSWORD:-}" ] || add admin "$FRAMECAP_MQTT_ADMIN_PASSWORD" admin
add ingest "$FRAMECAP_MQTT_INGEST_PASSWORD" ingest
add worker "$FRAMECAP_MQTT_WORKER_PASSWORD" worker
add web "$FRAMECAP_MQTT_WEB_PASSWORD" web
for pair in ${FRAMECAP_MQTT_DEVICES:-}; do
  case "${pair%%:*}" in admin|ingest|worker|web) echo "entrypoint: device named like a service: ${pair%%:*}" >&2; exit 2 ;; esac
  add "${pair%%:*}" "${pair#*:}" device
done
rm -f "$hashes"
printf '{"clients": [%s], "groups": [], "roles": [%s],\n "defaultACLAccess": {"publishClientSend": false, "publishClientReceive": false, "subscribe": false, "unsubscribe": true}}\n' \
  "$clients" "$roles" > "$out"
# the plugin rewrites the file when accounts change at run time: mosquitto's user must own it
if id mosquitto >/dev/null 2>&1; then chown mosquitto:mosquitto "$out"; fi
exec mosquitto -c "$conf"
