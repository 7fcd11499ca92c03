#!/usr/bin/env bash
# Installs maintenance-bridge as a systemd service on Debian, Ubuntu, RHEL and their kin: its own
# venv, /etc/default/maintenance-bridge, the hardened unit. Idempotent, so a VM start-up script
# can run it on every boot: the service is restarted only when something changed.
#
#   TOPIC=projects/P/topics/T bash install.sh [PACKAGE]
#
# PACKAGE is a source tree, a wheel or sdist (path or URL), or a pinned name such as
# maintenance-bridge==0.1.0; a bare or range-pinned name is refused (whoever registers it would run
# as root here). Default: $PACKAGE, else the source tree this script sits in. A VM start-up script
# uses deploy/vm-install.sh, which checks the wheel's sha256 before handing it to this script.
#
# Environment:
#   TOPIC, BRIDGE_*   settings for the service. If any is given, $ETC_DIR/maintenance-bridge is
#                     rewritten to hold exactly those; if none is, the file is left alone.
#   PREFIX            install root, venv in $PREFIX/venv        (/opt/maintenance-bridge)
#   SYSTEMD_DIR       where the unit goes                       (/etc/systemd/system)
#   ETC_DIR           where the environment file goes          (/etc/default)
#   BIN_DIR           where `maintenance-bridge` is linked, so that `status` and `listen` are on
#                     PATH ("" for no link)                     (/usr/local/bin)
#   PYTHON            interpreter for the venv (default: python3 if >= 3.10, else python3.1x)
#   PACKAGE_HASHES    sha256 hashes (hex, space-separated) that PACKAGE, a pinned name, must match:
#                     it is downloaded with --require-hashes first, and refused on a mismatch
#   EXTRAS            the package's extras, e.g. "grpc" (--pubsub-transport grpc; pin it with
#                     deploy/constraints-grpc.txt in PIP_ARGS); default none: no gRPC
#   PIP_ARGS          extra `pip install` arguments, split on spaces
#                     (e.g. "--constraint /path/constraints.txt" or "--index-url URL")
#   VENV_ARGS         extra `python -m venv` arguments
#   UPGRADE=1         pip install --upgrade
#   NO_SYSTEMCTL=1    never call systemctl (tests, image builds, chroots)
#   NO_PACKAGES=1     never call apt-get/dnf; fail if Python's venv support is missing
#
# Exit status: 0 installed (changed or not), 1 failure. The last line says what changed.
set -euo pipefail
umask 022 # the service runs as a dynamic uid: the venv must be world-readable

UNIT_NAME=maintenance-bridge.service
DEFAULT_PREFIX=/opt/maintenance-bridge
PREFIX=${PREFIX:-$DEFAULT_PREFIX}
SYSTEMD_DIR=${SYSTEMD_DIR:-/etc/systemd/system}
ETC_DIR=${ETC_DIR:-/etc/default}
BIN_DIR=${BIN_DIR-/usr/local/bin}
VENV="$PREFIX/venv"
ENV_FILE="$ETC_DIR/maintenance-bridge"
UNIT_FILE="$SYSTEMD_DIR/$UNIT_NAME"

log() { printf 'install.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

script_dir=""
if [ -n "${BASH_SOURCE[0]:-}" ] && [ -f "${BASH_SOURCE[0]}" ]; then
  script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fi

package=${1:-${PACKAGE:-}}
if [ -z "$package" ]; then
  [ -n "$script_dir" ] && [ -f "$script_dir/../pyproject.toml" ] ||
    die "no PACKAGE: give a wheel (scripts/build-release), a source tree or maintenance-bridge==VERSION"
  package=$(cd "$script_dir/.." && pwd)
fi
case "$package" in
  . | */* | *.whl | *.tar.gz | *==*) ;;
  *) die "PACKAGE=$package is not pinned: use maintenance-bridge==VERSION, a wheel or a path" ;;
esac

if [ -z "${NO_SYSTEMCTL:-}" ] && [ "$(id -u)" != 0 ]; then
  die "run as root (or set NO_SYSTEMCTL=1 and PREFIX, SYSTEMD_DIR, ETC_DIR to writable paths)"
fi
case "$PREFIX" in
  /home/* | /root/* | /tmp/* | /var/tmp/*)
    [ -n "${NO_SYSTEMCTL:-}" ] ||
      log "warning: the unit's ProtectHome=/PrivateTmp= hide $PREFIX from the service" ;;
esac

changed=()

# --- Python with venv support -------------------------------------------------------------
usable() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }
has_venv() { "$1" -c 'import ensurepip, venv' 2>/dev/null; }

pick_python() {
  local candidate
  # The distribution's default first: it is the one that gets security updates.
  for candidate in python3 python3.13 python3.12 python3.11 python3.10; do
    if command -v "$candidate" >/dev/null && usable "$candidate"; then
      echo "$candidate"
      return
    fi
  done
  return 1
}

install_packages() {
  [ -z "${NO_PACKAGES:-}" ] || die "Python >= 3.10 with venv support is missing and NO_PACKAGES is set"
  if command -v apt-get >/dev/null; then
    # Debian and Ubuntu split venv support (ensurepip) into python3-venv.
    local pkg=python3-venv
    if [ -n "${1:-}" ] && [ "${1##*/}" != python3 ]; then pkg="${1##*/}-venv"; fi
    log "installing python3 and $pkg with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 "$pkg" >/dev/null
  elif command -v dnf >/dev/null; then
    # RHEL 8 and 9 default to 3.6 and 3.9; their AppStream has newer ones with venv built in.
    log "installing a Python >= 3.10 with dnf"
    dnf install -y -q python3.12 python3.12-pip >/dev/null 2>&1 ||
      dnf install -y -q python3.11 python3.11-pip >/dev/null
  else
    die "no Python >= 3.10 with venv support, and neither apt-get nor dnf to install one"
  fi
  changed+=(python)
}

if [ -n "${PYTHON:-}" ]; then
  usable "$PYTHON" || die "PYTHON=$PYTHON is not Python >= 3.10"
  python=$PYTHON
elif ! python=$(pick_python); then
  install_packages ""
  python=$(pick_python) || die "no Python >= 3.10 even after installing one"
fi
if ! has_venv "$python"; then
  install_packages "$(command -v "$python")"
  has_venv "$python" || die "$python still has no venv support"
fi

# --- The venv and the package -------------------------------------------------------------
install -d -m 0755 "$PREFIX"
if command -v flock >/dev/null; then
  # A boot-time run and a manual one must not pip install into the same venv at once.
  exec 9>>"$PREFIX/.install.lock" # append: a re-run must not even touch it
  flock 9
fi

# A venv breaks when its interpreter goes away (a distribution upgrade from 3.11 to 3.13): then it
# is rebuilt, not patched.
if [ -d "$VENV" ] && ! "$VENV/bin/python" -c '' 2>/dev/null; then
  log "venv at $VENV no longer runs; recreating it"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  read -r -a venv_args <<<"${VENV_ARGS:-}"
  log "creating venv $VENV with $python"
  "$python" -m venv "${venv_args[@]}" "$VENV"
  changed+=(venv)
fi

# What is installed, down to file hashes: every wheel's RECORD. pip rewrites an identical tree
# when given a source directory; this tells a real change from that.
fingerprint() {
  find "$VENV" -path '*/site-packages/*.dist-info/RECORD' -print0 | sort -z | xargs -0 -r cat |
    sha256sum | cut -d' ' -f1
}
before=$(fingerprint)
read -r -a pip_args <<<"${PIP_ARGS:-}"
if [ -n "${PACKAGE_HASHES:-}" ]; then
  # The package alone is hash-checked (--no-deps); its dependencies follow PIP_ARGS' constraints.
  case "$package" in *==*) ;; *) die "PACKAGE_HASHES needs a pinned name (maintenance-bridge==VERSION)" ;; esac
  requirement=$package
  for h in $PACKAGE_HASHES; do
    [[ "$h" =~ ^[0-9a-f]{64}$ ]] || die "PACKAGE_HASHES: not a sha256: $h"
    requirement+=" --hash=sha256:$h"
  done
  download=$(mktemp -d)
  trap 'rm -rf "$download"' EXIT
  printf '%s\n' "$requirement" >"$download/requirement.txt"
  "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-input --no-deps \
    --require-hashes "${pip_args[@]}" --requirement "$download/requirement.txt" --dest "$download" ||
    die "pip refused $package: not found, or no file matches PACKAGE_HASHES; nothing installed"
  package=$(find "$download" -name 'maintenance_bridge-*' -print -quit)
fi
[ -z "${UPGRADE:-}" ] || pip_args+=(--upgrade)
if [ -n "${EXTRAS:-}" ]; then
  [[ "$EXTRAS" =~ ^[a-z]+(,[a-z]+)*$ ]] || die "EXTRAS=$EXTRAS: comma-separated extra names (grpc)"
  package+="[$EXTRAS]"
fi
log "pip install $package"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
  "${pip_args[@]}" "$package"
[ -x "$VENV/bin/maintenance-bridge" ] || die "$VENV/bin/maintenance-bridge missing after pip install"
[ "$(fingerprint)" = "$before" ] || changed+=(package)
# Operators run `maintenance-bridge status` and `listen` by name. Not a change: the service
# does not need a restart for it.
if [ -n "$BIN_DIR" ] && [ "$(readlink "$BIN_DIR/maintenance-bridge" 2>/dev/null)" != "$VENV/bin/maintenance-bridge" ]; then
  install -d -m 0755 "$BIN_DIR"
  ln -sfn "$VENV/bin/maintenance-bridge" "$BIN_DIR/maintenance-bridge"
fi

# --- Files: written only when their content differs, atomically -------------------------
# put MODE DEST < content; returns 0 when DEST changed.
put() {
  local mode=$1 dest=$2 tmp
  install -d -m 0755 "$(dirname "$dest")"
  tmp=$(mktemp "$(dirname "$dest")/.maintenance-bridge.XXXXXX")
  cat >"$tmp"
  if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then
    rm -f "$tmp"
    return 1
  fi
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$dest"
}

env_content() {
  local name value
  echo "# Written by maintenance-bridge's install.sh from its TOPIC and BRIDGE_* variables;"
  echo "# re-run it to change this file. Every setting: maintenance-bridge run --help."
  for name in $(compgen -e | grep '^BRIDGE_' | sort); do
    value=${!name}
    case "$value" in *$'\n'*) die "$name contains a newline" ;; esac
    # Double quotes with \ " $ ` escaped: read the same by systemd and by a shell.
    value=${value//\\/\\\\}
    value=${value//\"/\\\"}
    value=${value//\$/\\\$}
    value=${value//\`/\\\`}
    printf '%s="%s"\n' "$name" "$value"
  done
}
if [ -n "${TOPIC:-}" ] && [ -z "${BRIDGE_TOPIC:-}" ]; then export BRIDGE_TOPIC="$TOPIC"; fi
if compgen -e | grep -q '^BRIDGE_'; then
  # 0600: systemd reads it as root; the settings may one day include something private.
  env_text=$(env_content)
  if printf '%s\n' "$env_text" | put 0600 "$ENV_FILE"; then changed+=(env); fi
elif [ ! -f "$ENV_FILE" ]; then
  log "no TOPIC or BRIDGE_* given: the bridge will print events to stdout until $ENV_FILE sets BRIDGE_TOPIC"
fi

unit_content() {
  if [ -n "$script_dir" ] && [ -f "$script_dir/$UNIT_NAME" ]; then
    cat "$script_dir/$UNIT_NAME"
  else
    # Run from a start-up script on its own: the same unit, embedded (tests/test_deploy.py keeps
    # this copy identical to deploy/maintenance-bridge.service).
    cat <<'UNIT'
# maintenance-bridge: publishes this VM's maintenance and preemption notices to Pub/Sub.
# Installed by deploy/install.sh (which rewrites ExecStart when PREFIX is not /opt/maintenance-bridge).
# Settings: /etc/default/maintenance-bridge (BRIDGE_TOPIC=projects/P/topics/T, ...).
# Operations (state, logs, upgrades): docs/operations.md.

[Unit]
Description=Compute Engine maintenance notices to Pub/Sub (maintenance-bridge)
Wants=network-online.target
After=network-online.target
# Never give up restarting: a bridge that stopped after five quick failures would miss the one
# notice that matters. RestartSec=1 already paces the attempts.
StartLimitIntervalSec=0

[Service]
Type=exec
ExecStart=/opt/maintenance-bridge/venv/bin/maintenance-bridge run
# Defaults first, the admin's file second: EnvironmentFile= wins over Environment=.
Environment=BRIDGE_STATE_DIR=/var/lib/maintenance-bridge
Environment=BRIDGE_LOG_FORMAT=json
Environment=PYTHONUNBUFFERED=1
EnvironmentFile=-/etc/default/maintenance-bridge
SyslogIdentifier=maintenance-bridge
Restart=always
RestartSec=1
# SIGTERM starts the drain (bounded by BRIDGE_DRAIN_TIMEOUT, 5 s by default); leave it room.
TimeoutStopSec=30

# --- Identity and state -------------------------------------------------------------------
# A throw-away uid per start; systemd owns /var/lib/maintenance-bridge (really
# /var/lib/private/maintenance-bridge) and chowns it to that uid, so the SQLite state and outbox
# survive restarts and reboots with nobody else able to read them.
DynamicUser=yes
StateDirectory=maintenance-bridge
StateDirectoryMode=0700
UMask=0077

# --- Hardening ----------------------------------------------------------------------------
# The process needs: read its venv, write its state dir, talk HTTP to 169.254.169.254 and HTTPS
# to pubsub.googleapis.com, and spawn --exec hooks. Everything else is taken away.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
PrivateUsers=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
# Not set, on purpose: MemoryDenyWriteExecute= (ctypes/cffi callbacks may need writable and
# executable memory: a crash loop costs more than it protects), IPAddressAllow= (Pub/Sub
# endpoints have no fixed addresses). --exec hooks inherit all of this: see docs/operations.md.
# The process idles near 70 MB; the cap turns a leak into a restart, not a host-wide OOM.
MemoryMax=512M
TasksMax=64

[Install]
WantedBy=multi-user.target
UNIT
  fi
}
# The unit names the default paths; point it at this PREFIX and ETC_DIR. (Captured first so that
# a failure stops the script instead of reading as "unchanged".)
unit_text=$(unit_content | sed -e "s#$DEFAULT_PREFIX/venv/#$VENV/#g" \
  -e "s#^EnvironmentFile=-/etc/default/maintenance-bridge\$#EnvironmentFile=-$ENV_FILE#")
if printf '%s\n' "$unit_text" | put 0644 "$UNIT_FILE"; then changed+=(unit); fi

# --- systemd ------------------------------------------------------------------------------
if [ -z "${NO_SYSTEMCTL:-}" ]; then
  if [[ " ${changed[*]} " == *" unit "* ]]; then systemctl daemon-reload; fi
  if ! systemctl is-enabled --quiet "$UNIT_NAME"; then
    systemctl enable --quiet "$UNIT_NAME"
    changed+=(enabled)
  fi
  if [ ${#changed[@]} -gt 0 ]; then
    log "restarting $UNIT_NAME"
    systemctl restart "$UNIT_NAME"
  elif ! systemctl is-active --quiet "$UNIT_NAME"; then
    systemctl start "$UNIT_NAME"
  fi
fi

if [ ${#changed[@]} -eq 0 ]; then
  echo "maintenance-bridge: up to date, nothing changed"
else
  echo "maintenance-bridge: changed: ${changed[*]}"
fi
