#!/usr/bin/env bash
# Prepare a Docker engine on a machine without systemd and without Docker Hub: install the Debian
# packages (docker.io, docker-compose 1.29, debootstrap) when missing, start dockerd in the background
# when it is not answering, and build the base image local/debian:bookworm from Debian's own packages
# (debootstrap) when it does not exist. Idempotent: a second run only checks. Needs root (or sudo).
#
# Env: DOCKERD_LOG (default /tmp/dockerd.log), DOCKERD_WAIT_S (default 90),
#      BASE_IMAGE_TAG (default local/debian:bookworm), DEBIAN_SUITE (default bookworm),
#      DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

DOCKERD_LOG="${DOCKERD_LOG:-/tmp/dockerd.log}"
DOCKERD_WAIT_S="${DOCKERD_WAIT_S:-90}"
BASE_IMAGE_TAG="${BASE_IMAGE_TAG:-local/debian:bookworm}"
DEBIAN_SUITE="${DEBIAN_SUITE:-bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

log() { echo "docker-env: $*" >&2; }
die() {
	echo "docker-env: ERROR: $*" >&2
	exit 1
}

SUDO=()
if [[ "$(id -u)" != 0 ]]; then
	command -v sudo >/dev/null || die "must run as root (or with sudo available) to install packages and start dockerd"
	SUDO=(sudo)
fi

install_packages() {
	local missing=()
	command -v dockerd >/dev/null || missing+=(docker.io)
	command -v docker-compose >/dev/null || missing+=(docker-compose)
	command -v debootstrap >/dev/null || missing+=(debootstrap)
	if ((${#missing[@]} == 0)); then
		log "packages present (dockerd, docker-compose, debootstrap)"
		return
	fi
	command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand"
	log "installing ${missing[*]}"
	"${SUDO[@]}" apt-get update -qq || die "apt-get update failed"
	DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null ||
		die "apt-get install ${missing[*]} failed"
}

docker_ok() { "${SUDO[@]}" docker info >/dev/null 2>&1; }

start_dockerd() {
	if docker_ok; then
		log "docker engine already running"
		return
	fi
	if pgrep -x dockerd >/dev/null; then
		log "dockerd is running but not answering yet; waiting"
	else
		log "starting dockerd (log: $DOCKERD_LOG)"
		# setsid + nohup: the daemon outlives this script and the shell that called it.
		"${SUDO[@]}" setsid nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
	fi
	local waited=0
	until docker_ok; do
		if ((waited >= DOCKERD_WAIT_S)); then
			tail -n 30 "$DOCKERD_LOG" >&2 2>/dev/null || true
			die "docker engine not answering after ${DOCKERD_WAIT_S}s (see $DOCKERD_LOG)"
		fi
		sleep 1
		waited=$((waited + 1))
	done
	log "docker engine up after ${waited}s"
}

ROOTFS=""
cleanup() {
	# The rootfs is owned by root and holds device nodes: remove it with the same rights.
	if [[ -n "$ROOTFS" ]]; then "${SUDO[@]}" rm -rf "$ROOTFS"; fi
}
trap cleanup EXIT

build_base_image() {
	if "${SUDO[@]}" docker image inspect "$BASE_IMAGE_TAG" >/dev/null 2>&1; then
		log "base image $BASE_IMAGE_TAG present"
		return
	fi
	ROOTFS="$(mktemp -d /tmp/debootstrap.XXXXXX)"
	local build_log="$ROOTFS.log"
	log "building $BASE_IMAGE_TAG with debootstrap ($DEBIAN_SUITE from $DEBIAN_MIRROR)"
	local start=$SECONDS
	"${SUDO[@]}" debootstrap --variant=minbase "$DEBIAN_SUITE" "$ROOTFS" "$DEBIAN_MIRROR" >"$build_log" 2>&1 || {
		tail -n 30 "$build_log" >&2
		die "debootstrap failed (full log: $build_log)"
	}
	# Leave no package lists or caches in the image (like the official debian images).
	"${SUDO[@]}" rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb
	"${SUDO[@]}" tar -C "$ROOTFS" -c . | "${SUDO[@]}" docker import \
		--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		--change 'CMD ["bash"]' - "$BASE_IMAGE_TAG" >/dev/null || die "docker import of $BASE_IMAGE_TAG failed"
	rm -f "$build_log"
	log "built $BASE_IMAGE_TAG in $((SECONDS - start))s"
}

install_packages
start_dockerd
build_base_image
command -v docker-compose >/dev/null || die "docker-compose not on PATH"
log "ready: $("${SUDO[@]}" docker version --format '{{.Server.Version}}' 2>/dev/null), $(docker-compose version --short 2>/dev/null)"
