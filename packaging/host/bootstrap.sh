#!/bin/sh
# /etc/fireactions/bootstrap.sh: the command seed 003's cloud-init user-data runs
# (runcmd: [/etc/fireactions/bootstrap.sh]). On civm-host it checks the files cloud-init wrote
# next to it (github-app-id, github-private-key.pem, pools.json), writes /etc/civm/serve.yaml
# from them and starts civm serve; see civm-host (docs/hosts.md). KERNEL_PATH and
# PYTHON_WITH_YAML, which the NixOS image's wrapper sets, are not needed.
exec /usr/local/sbin/civm-host bootstrap --fireactions "$@"
