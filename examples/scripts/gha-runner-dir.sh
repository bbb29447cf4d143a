#!/bin/sh
# Provision step of examples/rust-ci-runner.yaml; runs inside the booted image as root.
# Prepares the GitHub Actions runner's folder for the `runner` user. The runner itself is a
# placeholder here: fetch a pinned release and check its sha256 in a real image, e.g.
#   curl -fsSLo /tmp/r.tgz https://github.com/actions/runner/releases/download/vX/actions-runner-linux-x64-X.tar.gz
#   echo "SHA256  /tmp/r.tgz" | sha256sum -c - && tar -C /home/runner/actions-runner -xzf /tmp/r.tgz
set -eu
dir=/home/runner/actions-runner
install -d -o runner -g runner -m 0755 "$dir"
cat > "$dir/README" <<'EOT'
Placeholder for the GitHub Actions runner (actions/runner). civm's guest agent configures
and starts it with the registration token from instance.json.
EOT
chown runner:runner "$dir/README"
