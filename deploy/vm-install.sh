#!/usr/bin/env bash
# The start-up script of the module's instance template (terraform/locals.tf puts the settings
# below in front of this file, as exports): fetches the bridge, refuses it unless its sha256 is
# the one Terraform recorded, installs it with deploy/install.sh (dependencies pinned by
# deploy/constraints.txt: the default install, Pub/Sub over REST, no gRPC; with MB_EXTRAS=grpc
# also maintenance-bridge[grpc] at deploy/constraints-grpc.txt's pins) and configures the Ops
# Agent. It runs on every boot; install.sh
# restarts the service only when something changed. tests/test_release.py runs this same file
# against a locally built wheel.
#
# Settings (environment):
#   MB_WHEEL_URL, MB_WHEEL_SHA256
#       the bridge's wheel and its sha256 (hex). gs://BUCKET/OBJECT is read with the VM's service
#       account through the Cloud Storage JSON API (no gsutil needed); http(s) URLs as they are.
#   MB_PACKAGE, MB_PACKAGE_HASHES
#       instead of a wheel: maintenance-bridge==VERSION from the package index, accepted only with
#       one of these sha256 hashes (space-separated hex).
#   MB_WHEELHOUSE_URL, MB_WHEELHOUSE_SHA256
#       optional: a tar.gz of wheels (scripts/build-release --wheelhouse). pip then installs from
#       it alone and never reaches a package index (VMs without external IP or Cloud NAT).
#   MB_INSTALL_SH, MB_CONSTRAINTS   deploy/install.sh and deploy/constraints.txt (default: beside
#                                   this file)
#   MB_EXTRAS             "grpc": install maintenance-bridge[grpc] (--pubsub-transport grpc), pinned
#                         by MB_CONSTRAINTS_GRPC (default: constraints-grpc.txt beside this file)
#   MB_OPS_AGENT          "configure": write ops-agent/config.yaml (beside this file) as the Ops
#                         Agent's configuration and restart the agent if it changed; "install":
#                         the same, installing the agent from Google's repository when missing
#                         (skipped under NO_SYSTEMCTL); unset: the Ops Agent is left alone.
#   MB_OPS_AGENT_DIR      the agent's configuration directory (default /etc/google-cloud-ops-agent)
#   MB_STORAGE_API        Cloud Storage JSON API base (tests point it at a local server)
#   MB_WORK               scratch directory (default /run/maintenance-bridge-install)
#   GCE_METADATA_HOST     metadata server for the access token (default metadata.google.internal)
#   and everything install.sh reads: TOPIC, BRIDGE_*, PREFIX, SYSTEMD_DIR, ETC_DIR, BIN_DIR, ...
set -euo pipefail
umask 022

log() { printf 'vm-install.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
install_sh=${MB_INSTALL_SH:-$here/install.sh}
constraints=${MB_CONSTRAINTS:-$here/constraints.txt}
storage_api=${MB_STORAGE_API:-https://storage.googleapis.com/storage/v1}
metadata=http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1
work=${MB_WORK:-/run/maintenance-bridge-install}
[ -f "$install_sh" ] || die "install.sh not found at $install_sh"
[ -f "$constraints" ] || die "constraints not found at $constraints"

rm -rf "$work"
install -d -m 0700 "$work"
trap 'rm -rf "$work"' EXIT

curl_get() { # URL DEST [curl args...]
  local url=$1 dest=$2
  shift 2
  curl --fail --silent --show-error --location --proto '=https,http' --retry 5 \
    --retry-connrefused --connect-timeout 10 --max-time 300 "$@" --output "$dest" "$url"
}

access_token() {
  local json
  json=$(curl --fail --silent --show-error --retry 5 --retry-connrefused -H 'Metadata-Flavor: Google' \
    "$metadata/instance/service-accounts/default/token") || die "no access token from the metadata server"
  sed -n 's/.*"access_token"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' <<<"$json"
}

# fetch URL SHA256 DEST: DEST holds URL's content, or the script stops before installing anything.
fetch() {
  local url=$1 sha=$2 dest=$3 bucket object token actual
  [[ "$sha" =~ ^[0-9a-f]{64}$ ]] || die "no valid sha256 for $url: refusing to install what cannot be checked"
  case "$url" in
    gs://*)
      bucket=${url#gs://}
      bucket=${bucket%%/*}
      object=${url#gs://"$bucket"/}
      [[ "$object" =~ ^[A-Za-z0-9._/+-]+$ ]] || die "unsupported characters in object name $object"
      token=$(access_token)
      curl_get "$storage_api/b/$bucket/o/${object//\//%2F}?alt=media" "$dest" \
        -H "Authorization: Bearer $token" || die "cannot download $url"
      ;;
    http://* | https://*) curl_get "$url" "$dest" || die "cannot download $url" ;;
    *) die "unsupported URL $url (gs://, https:// or http://)" ;;
  esac
  actual=$(sha256sum "$dest" | cut -d' ' -f1)
  if [ "$actual" != "$sha" ]; then
    rm -f "$dest"
    die "sha256 mismatch for $url: got $actual, expected $sha; nothing installed"
  fi
  log "verified $url (sha256 $sha)"
}

pip_args=(--constraint "$constraints")
case "${MB_EXTRAS:-}" in
  "") ;;
  grpc)
    constraints_grpc=${MB_CONSTRAINTS_GRPC:-$here/constraints-grpc.txt}
    [ -f "$constraints_grpc" ] || die "MB_EXTRAS=grpc: constraints not found at $constraints_grpc"
    pip_args+=(--constraint "$constraints_grpc")
    ;;
  *) die "MB_EXTRAS=$MB_EXTRAS: the only extra is grpc" ;;
esac
if [ -n "${MB_WHEELHOUSE_URL:-}" ]; then
  fetch "$MB_WHEELHOUSE_URL" "${MB_WHEELHOUSE_SHA256:-}" "$work/wheelhouse.tar.gz"
  mkdir "$work/wheelhouse"
  tar -xzf "$work/wheelhouse.tar.gz" -C "$work/wheelhouse" --no-same-owner
  pip_args+=(--no-index --find-links "$work/wheelhouse")
fi

if [ -n "${MB_WHEEL_URL:-}" ]; then
  name=${MB_WHEEL_URL%%\?*}
  name=${name##*/}
  [[ "$name" =~ ^maintenance_bridge-[^/]+\.whl$ ]] || die "$MB_WHEEL_URL does not name a maintenance_bridge wheel"
  package="$work/$name"
  fetch "$MB_WHEEL_URL" "${MB_WHEEL_SHA256:-}" "$package"
  package_hashes=""
elif [ -n "${MB_PACKAGE:-}" ]; then
  [[ "$MB_PACKAGE" =~ ^maintenance-bridge==[0-9][A-Za-z0-9.+!-]*$ ]] ||
    die "MB_PACKAGE=$MB_PACKAGE is not pinned (maintenance-bridge==VERSION)"
  # install.sh downloads it with --require-hashes before installing anything.
  package=$MB_PACKAGE
  package_hashes=${MB_PACKAGE_HASHES:-}
  [ -n "$package_hashes" ] || die "MB_PACKAGE needs MB_PACKAGE_HASHES (sha256 of its wheel or sdist)"
else
  die "nothing to install: set MB_WHEEL_URL and MB_WHEEL_SHA256, or MB_PACKAGE and MB_PACKAGE_HASHES"
fi

EXTRAS="${MB_EXTRAS:-}" PACKAGE="$package" PACKAGE_HASHES="$package_hashes" PIP_ARGS="${pip_args[*]}" \
  bash "$install_sh"

case "${MB_OPS_AGENT:-}" in
  "") exit 0 ;;
  configure | install) ;;
  *) die "MB_OPS_AGENT=$MB_OPS_AGENT: use configure or install" ;;
esac
agent_dir=${MB_OPS_AGENT_DIR:-/etc/google-cloud-ops-agent}
if [ "$MB_OPS_AGENT" = install ] && [ -z "${NO_SYSTEMCTL:-}" ] &&
  ! systemctl cat google-cloud-ops-agent.service >/dev/null 2>&1; then
  # Google's documented installer: it adds Google's apt/yum repository, whose packages the
  # package manager verifies with Google's signing key.
  log "installing the Ops Agent"
  curl_get https://dl.google.com/cloudagents/add-google-cloud-ops-agent-repo.sh "$work/add-repo.sh" ||
    die "cannot download the Ops Agent installer"
  bash "$work/add-repo.sh" --also-install
fi
if ! cmp -s "$here/ops-agent/config.yaml" "$agent_dir/config.yaml"; then
  install -D -m 0644 "$here/ops-agent/config.yaml" "$agent_dir/config.yaml"
  log "Ops Agent configuration written to $agent_dir/config.yaml"
  if [ -z "${NO_SYSTEMCTL:-}" ]; then systemctl restart google-cloud-ops-agent; fi
fi
