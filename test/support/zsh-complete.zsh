# Types lines into an interactive zsh (zsh/zpty) with civm's completion loaded and prints what
# the terminal showed for each: the real completion system, not a syntax check.
# Usage: zsh -f zsh-complete.zsh fpath DIR|source FILE KEYS...
#   fpath DIR:   DIR holds _civm (autoloaded on the first TAB, as `civm completion zsh > "${fpath[1]}/_civm"`)
#   source FILE: FILE is sourced after compinit (as `source <(civm completion zsh)` in .zshrc)
# Each KEYS (text with TABs) is typed on a fresh line; the line is then cleared (^U) and the
# output up to a marker is printed after "=== case N".
zmodload zsh/zpty || exit 2
local mode=$1 where=$2
shift 2
zpty z zsh -f -i
# Only the completion system's own folders: compinit reads every file on $fpath, a second or
# more for the full set on a loaded machine.
local setup="PS1='%% '; unsetopt beep; fpath=(\${(M)fpath:#*/Completion(|/Base|/Unix|/Zsh)})"
if [[ $mode == fpath ]]; then setup="$setup; fpath=(${(q)where} \$fpath)"; fi
setup="$setup; autoload -U compinit; compinit -u -D"
if [[ $mode == source ]]; then setup="$setup; source ${(q)where}"; fi
zpty -w z "$setup; print RE''ADY"
zpty -r -m z out '*READY*' || exit 3
local i=0 keys
for keys in "$@"; do
  i=$((i + 1))
  zpty -w -n z "$keys"
  sleep 0.1
  zpty -w -n z $'\x15'
  zpty -w z "print CASE${i}E''ND"
  zpty -r -m z out "*CASE${i}END*" || exit 4
  print -r -- "=== case $i"
  print -r -- "$out"
done
zpty -d z
