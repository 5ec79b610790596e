#!/bin/sh
# Installs the framecap edge daemon from this source tree, as deploy/systemd/framecap-edge.service
# runs it: on a Jetson (JetPack 6 / L4T r36, Ubuntu 22.04) or another Debian/Ubuntu machine.
#   sudo deploy/scripts/install-edge.sh               everything below (then edit the config and
#                                                     the password, and start the service)
#   deploy/scripts/install-edge.sh --no-service       steps 1-3 only (deploy/Dockerfile.edge)
#   deploy/scripts/install-edge.sh --venv-only        steps 2-3 only (no apt, no root needed)
# Options: --prefix DIR (default /opt/framecap: the venv is DIR/venv, the command
#   DIR/venv/bin/framecap), --opencv system|pypi (below). Extra pip arguments (an offline
#   wheelhouse: --no-index --find-links DIR) in $FRAMECAP_PIP_ARGS.
#
# 1. apt: python3-venv, and OpenCV with GStreamer (python3-opencv; JetPack's nvidia-opencv serves
#    as well) with the GStreamer plugins the example pipeline uses.
# 2. A venv with --system-site-packages, so it imports that OpenCV, and framecap installed into
#    it WITHOUT its `edge` extra: the extra is PyPI's opencv-python-headless, which has no
#    GStreamer and, installed, would hide the system cv2 (the Jetson CSI pipeline in
#    deploy/config/edge.yaml would then never open). numpy stays below 2 (edge-constraints.txt):
#    the system cv2 is built against numpy 1.x. Any pip OpenCV in the venv is removed.
# 3. Check: the venv's cv2 has GStreamer (python -m edge.gstreamer); exit 2 with the fix if not.
# 4. User framecap (group video: camera devices), /etc/framecap/edge.yaml (the example, if none),
#    /etc/framecap/edge.env (FRAMECAP_MQTT_PASSWORD, mode 600, if none), the unit, enabled.
# --opencv pypi: for a machine without a GStreamer source (USB camera index, file, rtsp://):
#    installs framecap[edge] (PyPI OpenCV) into a plain venv and skips the GStreamer check.
set -eu
prefix=/opt/framecap
mode=all
opencv=system
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --prefix=*) prefix="${1#*=}"; shift ;;
    --opencv) opencv="$2"; shift 2 ;;
    --opencv=*) opencv="${1#*=}"; shift ;;
    --no-service) mode=no-service; shift ;;
    --venv-only) mode=venv-only; shift ;;
    -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-edge: unknown option $1 (--help)" >&2; exit 2 ;;
  esac
done
case "$opencv" in system|pypi) ;; *) echo "install-edge: --opencv system or pypi, not $opencv" >&2; exit 2 ;; esac
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../.." && pwd)
grep -q '^name = "framecap"' "$src/pyproject.toml" 2>/dev/null \
  || { echo "install-edge: $src is not a framecap source tree" >&2; exit 2; }
venv="$prefix/venv"
say() { echo "install-edge: $*"; }
need_root() {
  [ "$(id -u)" -eq 0 ] || { echo "install-edge: run as root (sudo), or use --venv-only" >&2; exit 2; }
}

# 1. system packages
if [ "$mode" != venv-only ]; then
  need_root
  packages="python3 python3-venv python3-pip"
  if [ "$opencv" = system ]; then
    packages="$packages gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good"
    # JetPack's OpenCV (nvidia-opencv, from NVIDIA's L4T apt source) if it is installed, else the
    # distribution's: both are built with GStreamer
    /usr/bin/python3 -c 'import cv2' 2>/dev/null || packages="$packages python3-opencv"
  fi
  say "apt-get install $packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends $packages >/dev/null
fi

# 2. the venv and framecap in it
python=/usr/bin/python3
[ -x "$python" ] || python=$(command -v python3)
# shellcheck disable=SC2086
set -- ${FRAMECAP_PIP_ARGS:-}
if [ "$opencv" = system ]; then
  say "venv $venv (--system-site-packages: the system OpenCV), framecap without PyPI OpenCV"
  "$python" -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install -q "$@" --constraint "$here/edge-constraints.txt" "$src"
  # nothing may bring pip's OpenCV into the venv: it would hide the system cv2
  "$venv/bin/python" -m pip uninstall -q -y opencv-python opencv-python-headless \
    opencv-contrib-python opencv-contrib-python-headless >/dev/null 2>&1 || true
else
  say "venv $venv, framecap[edge] (PyPI OpenCV: no GStreamer pipelines)"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "$@" "$src[edge]"
fi
[ -x "$venv/bin/framecap" ] || { echo "install-edge: $venv/bin/framecap was not made" >&2; exit 1; }

# 3. the OpenCV the edge will import can open the example's GStreamer pipeline
if [ "$opencv" = system ]; then
  if ! "$venv/bin/python" -m edge.gstreamer; then
    echo "install-edge: the venv's OpenCV cannot open GStreamer pipelines (see above)" >&2
    exit 2
  fi
else
  "$venv/bin/python" -c 'import cv2' || { echo "install-edge: cv2 does not import" >&2; exit 2; }
fi
[ "$mode" = all ] || { say "done: $venv/bin/framecap"; exit 0; }

# 4. account, config, secrets, service
getent group video >/dev/null || groupadd --system video
if ! id framecap >/dev/null 2>&1; then
  useradd --system --user-group --groups video --home-dir /var/lib/framecap \
    --shell /usr/sbin/nologin framecap
fi
install -d -m 755 /etc/framecap
install -d -m 750 -o framecap -g framecap /var/lib/framecap
[ -f /etc/framecap/edge.yaml ] || install -m 644 "$src/deploy/config/edge.yaml" /etc/framecap/edge.yaml
if [ ! -f /etc/framecap/edge.env ]; then
  (umask 077; printf 'FRAMECAP_MQTT_PASSWORD=\n' > /etc/framecap/edge.env)
fi
sed "s#/opt/framecap/venv/bin/framecap#$venv/bin/framecap#" "$src/deploy/systemd/framecap-edge.service" \
  > /etc/systemd/system/framecap-edge.service
systemctl daemon-reload
systemctl enable framecap-edge.service
say "installed. Next: edit /etc/framecap/edge.yaml (device_id, source, mqtt.host), copy the"
say "broker's ca.crt to /etc/framecap/ca.crt, put the password in /etc/framecap/edge.env, check"
say "with: sudo -u framecap $venv/bin/framecap edge --config /etc/framecap/edge.yaml --validate-config"
say "then: systemctl start framecap-edge; journalctl -u framecap-edge -f"
