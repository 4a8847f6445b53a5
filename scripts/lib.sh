# Shared by the scripts in this folder (sourced, not run).

# install_packages PACKAGE...: installs Debian packages with apt-get (through
# sudo unless root); nothing when none is named.
install_packages() {
    (($#)) || return 0
    echo "$(basename "$0"): installing $*"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
