# Uploaded by examples/lvh-base-images.json (lvh's "upload" action, translated by civm to a
# "copy"). lvh replaces systemd's /etc/profile.d/70-systemd-shell-extra.sh with a version
# that does not trip over unset variables in `set -u` shells; this stand-in does the same
# job: it only sets the terminal title/prompt helpers when the variables exist.
if [ -n "${BASH_VERSION:-}" ] && [ -n "${PS1:-}" ] && [ -n "${TERM:-}" ]; then
    case "${TERM}" in
        xterm*|screen*|tmux*) PROMPT_COMMAND="${PROMPT_COMMAND:+$PROMPT_COMMAND; }printf '\033]0;%s@%s\007' \"\${USER:-}\" \"\${HOSTNAME%%.*}\"" ;;
    esac
fi
