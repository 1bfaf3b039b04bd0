# Sourced by the launch/ray-*.sh scripts: the Ray Jobs client settings they share.

command -v ray >/dev/null || { echo "$(basename "$0"): the 'ray' command is not on PATH (pip install 'ray[default]')" >&2; exit 2; }
# The Python that has ray: the one beside the `ray` command (a venv's or conda env's).
RAY_PYTHON="$(dirname "$(command -v ray)")/python"
[[ -x "$RAY_PYTHON" ]] || RAY_PYTHON=python3

# ray_auth_for ADDRESS: Ray 2.60 starts clusters with token authentication when a token exists
# (~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN), but its clients send the token
# only with RAY_AUTH_MODE=token ("Missing authentication token" otherwise). For a head on this
# machine (a 127.0.0.1/localhost address) the token is this machine's own, so it is turned on
# here; for a remote cluster, Ray's rule stands: export RAY_AUTH_MODE=token yourself, with
# that cluster's token.
ray_auth_for() {
    [[ -z "${RAY_AUTH_MODE:-}" ]] || return 0
    case "$1" in
        http://127.0.0.1:*|http://localhost:*|127.0.0.1:*|localhost:*) ;;
        *) return 0 ;;
    esac
    if [[ -n "${RAY_AUTH_TOKEN:-}" || -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; then
        export RAY_AUTH_MODE=token
    fi
}
