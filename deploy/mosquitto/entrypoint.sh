#!/bin/sh
# Writes mosquitto's password file from the environment (hashed by mosquitto_passwd), then runs
# the broker. FRAMECAP_MQTT_DEVICES: space-separated device_id:password pairs.
set -eu
passwd=/mosquitto/data/passwd
umask 077
: > "$passwd"
mosquitto_passwd -b "$passwd" ingest "$FRAMECAP_MQTT_INGEST_PASSWORD"
mosquitto_passwd -b "$passwd" worker "$FRAMECAP_MQTT_WORKER_PASSWORD"
mosquitto_passwd -b "$passwd" web "$FRAMECAP_MQTT_WEB_PASSWORD"
for pair in ${FRAMECAP_MQTT_DEVICES:-}; do
  mosquitto_passwd -b "$passwd" "${pair%%:*}" "${pair#*:}"
done
chown mosquitto:mosquitto "$passwd"
exec mosquitto -c /mosquitto/config/mosquitto.conf
