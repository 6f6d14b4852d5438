# Sourced by Kiln's setup scripts: apt_install PKG... installs Debian packages (as root, or with sudo),
# quietly; exits with a message naming the packages when that cannot be done here.
apt_install() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "need root or sudo to apt-get install $*" >&2; exit 1; }
    sudo=sudo
  fi
  command -v apt-get >/dev/null 2>&1 || { echo "no apt-get here: install $* (or their equivalents) by hand" >&2; exit 1; }
  echo "installing $* ..." >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
