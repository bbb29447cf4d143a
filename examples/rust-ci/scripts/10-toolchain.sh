#!/bin/sh
# A provision script (seed 000's scripts/NN-*.sh): runs as root inside the booted image, after
# the copy of files/ to /tmp/packer-files, as Packer ran them.
set -eu
install -m 0644 /tmp/packer-files/cargo.sh /etc/profile.d/cargo.sh
# The runner's tool cache (RUNNER_TOOL_CACHE) is where actions/setup-* look first.
ls -ld /opt/hostedtoolcache
