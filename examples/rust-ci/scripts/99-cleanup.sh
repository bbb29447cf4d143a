#!/bin/sh
# Last script: nothing of the build's support files stays in the image.
set -eu
rm -rf /tmp/packer-files
