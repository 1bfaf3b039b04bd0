# Sourced by the launch/ray-*.sh scripts: the Ray Jobs client settings they share.
#
# Ray 2.60 starts clusters with token authentication when a token exists (~/.ray/auth_token,
# $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN), but the job client only sends the token when
# RAY_AUTH_MODE=token: without it, every call fails with "Missing authentication token".
if [[ -z "${RAY_AUTH_MODE:-}" ]] && { [[ -n "${RAY_AUTH_TOKEN:-}" ]] || [[ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; }; then
    export RAY_AUTH_MODE=token
fi
command -v ray >/dev/null || { echo "$(basename "$0"): the 'ray' command is not on PATH (pip install 'ray[default]')" >&2; exit 2; }
# The Python that has ray: the one beside the `ray` command (a venv's or conda env's).
RAY_PYTHON="$(dirname "$(command -v ray)")/python"
[[ -x "$RAY_PYTHON" ]] || RAY_PYTHON=python3
