# /etc/profile.d/cargo.sh: rustup installs into the user's home; put cargo on PATH for login shells.
[ -d "$HOME/.cargo/bin" ] && PATH="$HOME/.cargo/bin:$PATH"
