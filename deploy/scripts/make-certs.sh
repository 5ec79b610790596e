#!/bin/sh
# Makes the TLS files of the broker's 8883 listener (deploy/compose.yaml): a private CA and a
# server certificate for the names devices connect to.
#   deploy/scripts/make-certs.sh broker.example.com [more names or IP addresses...]
# Writes into $FRAMECAP_CERT_DIR (default: deploy/mosquitto/certs next to this script):
#   ca.crt      copy to every device as /etc/framecap/ca.crt (edge.yaml: mqtt.tls.ca_certs)
#   ca.key      keep it off the broker host; it signs the next server certificate
#   server.crt  server.key   mounted into the broker (compose.yaml)
# Devices check the name: mqtt.host in edge.yaml must be one of the names given here.
# An existing CA is reused, so renewing the server certificate keeps devices' ca.crt valid.
set -eu
[ $# -ge 1 ] || { echo "usage: $0 BROKER_NAME [NAME_OR_IP...]" >&2; exit 2; }
command -v openssl >/dev/null 2>&1 || { echo "make-certs: openssl is needed (apt-get install openssl)" >&2; exit 2; }
dir="${FRAMECAP_CERT_DIR:-$(cd "$(dirname "$0")/.." && pwd)/mosquitto/certs}"
days="${FRAMECAP_CERT_DAYS:-825}"
mkdir -p "$dir"
# never commit keys: the directory ignores itself
[ -f "$dir/.gitignore" ] || printf '*\n' > "$dir/.gitignore"
umask 077
san=""
for name in "$@"; do
  case "$name" in
    *[!0-9.]*) case "$name" in *:*) kind=IP ;; *) kind=DNS ;; esac ;;
    *) kind=IP ;;
  esac
  san="$san${san:+,}$kind:$name"
done
if [ ! -f "$dir/ca.key" ]; then
  openssl req -x509 -newkey rsa:3072 -sha256 -nodes -days 3650 -subj "/CN=framecap broker CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
openssl req -newkey rsa:3072 -sha256 -nodes -subj "/CN=$1" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > "$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days "$days" -sha256 -extfile "$dir/server.ext" -out "$dir/server.crt" 2>/dev/null
rm -f "$dir/server.csr" "$dir/server.ext"
# mosquitto 2.0 reads the key after dropping to its own user: give that uid's group read access
# (eclipse-mosquitto image: uid and gid 1883; another broker: FRAMECAP_BROKER_GID)
gid="${FRAMECAP_BROKER_GID:-1883}"
chmod 644 "$dir/ca.crt" "$dir/server.crt"
chmod 640 "$dir/server.key"
if [ "$(id -u)" -eq 0 ]; then
  chgrp "$gid" "$dir/server.key"
else
  echo "make-certs: not root: run 'sudo chgrp $gid $dir/server.key' so the broker can read its key" >&2
fi
echo "make-certs: $dir/server.crt for $san, signed by $dir/ca.crt (copy ca.crt to each device)"
